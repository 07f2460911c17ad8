//! The server and client methods every place that runs traffic has: pods, nodes (host-network
//! servers and clients) and the cluster's external host.
//!
//! They are generated as inherent methods (no trait to import) by [`endpoint_methods!`], for a
//! type that provides:
//!
//! ```text
//! fn ep_netns(&self) -> &Path;          // where clients and servers run
//! fn ep_servers(&self) -> &ServerSet;   // its servers and what they saw
//! fn ep_answer(&self) -> &str;          // what its servers answer
//! fn ep_bind(&self) -> Bind;            // IPv4 only or dual-stack sockets
//! fn ep_check(&self) -> Result<()>;     // an error once it is gone
//! fn ep_log_dir(&self) -> &Path;        // where spawned processes log
//! ```
//!
//! Besides the servers and clients, every such place can run commands and closures inside
//! its netns (`exec`, `exec_ok`, `exec_timeout`, `spawn`, `run`).

macro_rules! endpoint_methods {
    ($what:literal) => {
        #[doc = concat!(
            "Runs `args` (program resolved through `PATH` and the sbin directories) inside the ",
            $what, "'s netns, like `nsenter --net=<netns> -- args…`, never `ip netns exec`; ",
            "30 s timeout. `Output` whatever the exit status."
        )]
        pub fn exec<S: AsRef<std::ffi::OsStr>>(
            &self,
            args: &[S],
        ) -> anyhow::Result<std::process::Output> {
            $crate::cmd::exec_in(Some(self.ep_netns()), args, $crate::EXEC_TIMEOUT)
        }

        /// Like `exec`, but an error unless it exits 0; returns stdout.
        pub fn exec_ok<S: AsRef<std::ffi::OsStr>>(&self, args: &[S]) -> anyhow::Result<String> {
            $crate::cmd::exec_ok_in(Some(self.ep_netns()), args, $crate::EXEC_TIMEOUT)
        }

        /// Like `exec` with a chosen timeout.
        pub fn exec_timeout<S: AsRef<std::ffi::OsStr>>(
            &self,
            args: &[S],
            timeout: std::time::Duration,
        ) -> anyhow::Result<std::process::Output> {
            $crate::cmd::exec_in(Some(self.ep_netns()), args, timeout)
        }

        #[doc = concat!(
            "Starts `cmd` inside the ", $what, "'s netns (setns between fork and exec), ",
            "stdout and stderr to a log file; the process is stopped when dropped."
        )]
        pub fn spawn(
            &self,
            cmd: &mut std::process::Command,
        ) -> anyhow::Result<$crate::NodeProcess> {
            $crate::node::spawn_logged(self.ep_netns(), self.ep_log_dir(), cmd)
        }

        #[doc = concat!("Runs `f` on a thread inside the ", $what, "'s netns.")]
        pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> anyhow::Result<T> {
            $crate::netns::in_netns(self.ep_netns(), f)
        }

        #[doc = concat!(
            "Starts TCP and UDP servers on each port in the ", $what, "'s netns (one thread for ",
            "all of them): `0.0.0.0:port`, or `[::]:port` accepting IPv4 and IPv6 when it has an ",
            "IPv6 address. Each TCP connection gets `<name>\\n` and a close; each UDP datagram ",
            "gets `<name>\\n` back to its source. Bind errors are returned here. Servers stop ",
            "with `stop_servers` or when the ", $what, " goes."
        )]
        pub fn serve(&self, ports: &[u16]) -> anyhow::Result<()> {
            self.serve_on(ports, ports)
        }

        /// TCP servers only (see `serve`).
        pub fn serve_tcp(&self, ports: &[u16]) -> anyhow::Result<()> {
            self.serve_on(ports, &[])
        }

        /// UDP servers only (see `serve`).
        pub fn serve_udp(&self, ports: &[u16]) -> anyhow::Result<()> {
            self.serve_on(&[], ports)
        }

        fn serve_on(&self, tcp: &[u16], udp: &[u16]) -> anyhow::Result<()> {
            self.ep_check()?;
            self.ep_servers()
                .start(self.ep_netns(), self.ep_answer(), tcp, udp, self.ep_bind())
        }

        #[doc = concat!("Stops all of the ", $what, "'s servers (their ports are closed when this returns).")]
        pub fn stop_servers(&self) {
            self.ep_servers().stop();
        }

        #[doc = concat!(
            "Every request the ", $what, "'s servers answered so far (client address as the server ",
            "saw it), oldest first; at most [`crate::server::MAX_SEEN`]."
        )]
        pub fn seen(&self) -> Vec<$crate::server::Seen> {
            self.ep_servers().seen()
        }

        /// Forgets what `seen` recorded.
        pub fn clear_seen(&self) {
            self.ep_servers().clear_seen();
        }

        #[doc = concat!("One TCP request from this ", $what, " (see [`crate::client::tcp_request`]).")]
        pub fn tcp_request(
            &self,
            dst: std::net::SocketAddrV4,
            timeout: std::time::Duration,
        ) -> anyhow::Result<$crate::client::Reply> {
            $crate::netns::in_netns(self.ep_netns(), || $crate::client::tcp_request(dst, timeout))?
        }

        #[doc = concat!(
            "One UDP request from this ", $what, " over a connected socket (see ",
            "[`crate::client::udp_request`])."
        )]
        pub fn udp_request(
            &self,
            dst: std::net::SocketAddrV4,
            timeout: std::time::Duration,
        ) -> anyhow::Result<$crate::client::Reply> {
            $crate::netns::in_netns(self.ep_netns(), || $crate::client::udp_request(dst, timeout))?
        }

        #[doc = concat!(
            "`n` sequential TCP requests from one thread that stays in the ", $what, "'s netns; ",
            "the outer error is only for failing to enter the netns."
        )]
        pub fn tcp_requests(
            &self,
            dst: std::net::SocketAddrV4,
            n: usize,
            timeout: std::time::Duration,
        ) -> anyhow::Result<Vec<anyhow::Result<$crate::client::Reply>>> {
            $crate::netns::in_netns(self.ep_netns(), || {
                $crate::client::tcp_requests(dst, n, timeout)
            })
        }

        #[doc = concat!(
            "`n` sequential UDP requests (new socket each) from one thread in the ", $what,
            "'s netns."
        )]
        pub fn udp_requests(
            &self,
            dst: std::net::SocketAddrV4,
            n: usize,
            timeout: std::time::Duration,
        ) -> anyhow::Result<Vec<anyhow::Result<$crate::client::Reply>>> {
            $crate::netns::in_netns(self.ep_netns(), || {
                $crate::client::udp_requests(dst, n, timeout)
            })
        }

        #[doc = concat!(
            "One TCP request (IPv4 or IPv6) from this ", $what, ", failures classified (see ",
            "[`crate::client::tcp_request_any`])."
        )]
        pub fn tcp_request_any(
            &self,
            dst: impl Into<std::net::SocketAddr>,
            timeout: std::time::Duration,
        ) -> Result<$crate::client::ReplyAny, $crate::client::RequestError> {
            let dst = dst.into();
            $crate::netns::in_netns(self.ep_netns(), || {
                $crate::client::tcp_request_any(dst, timeout)
            })?
        }

        #[doc = concat!(
            "One UDP request (IPv4 or IPv6) from this ", $what, ", failures classified, ICMP ",
            "errors with their sender (see [`crate::client::udp_request_any`])."
        )]
        pub fn udp_request_any(
            &self,
            dst: impl Into<std::net::SocketAddr>,
            timeout: std::time::Duration,
        ) -> Result<$crate::client::ReplyAny, $crate::client::RequestError> {
            let dst = dst.into();
            $crate::netns::in_netns(self.ep_netns(), || {
                $crate::client::udp_request_any(dst, timeout)
            })?
        }

        /// `n` sequential [`crate::client::tcp_request_any`]s from one thread in the netns.
        pub fn tcp_requests_any(
            &self,
            dst: impl Into<std::net::SocketAddr>,
            n: usize,
            timeout: std::time::Duration,
        ) -> anyhow::Result<
            Vec<Result<$crate::client::ReplyAny, $crate::client::RequestError>>,
        > {
            let dst = dst.into();
            $crate::netns::in_netns(self.ep_netns(), || {
                $crate::client::tcp_requests_any(dst, n, timeout)
            })
        }

        /// `n` sequential [`crate::client::udp_request_any`]s from one thread in the netns.
        pub fn udp_requests_any(
            &self,
            dst: impl Into<std::net::SocketAddr>,
            n: usize,
            timeout: std::time::Duration,
        ) -> anyhow::Result<
            Vec<Result<$crate::client::ReplyAny, $crate::client::RequestError>>,
        > {
            let dst = dst.into();
            $crate::netns::in_netns(self.ep_netns(), || {
                $crate::client::udp_requests_any(dst, n, timeout)
            })
        }
    };
}

pub(crate) use endpoint_methods;
