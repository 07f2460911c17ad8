use sluice::{datapath::Datapath, manifests, node, policy, translate};
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    let n: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse().unwrap())
        .unwrap_or(10_000);
    let dir = std::env::temp_dir().join(format!("reload-profile-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut text = String::new();
    for i in 0..n {
        let vip =
            std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(10, 96, 0, 1)) + i as u32);
        text.push_str(&format!("---\napiVersion: v1\nkind: Service\nmetadata: {{name: svc-{i}, namespace: bench}}\nspec:\n  clusterIP: {vip}\n  ports:\n  - {{name: http, port: 80, targetPort: 8080}}\n"));
        let eps: String = (0..10)
            .map(|k| {
                format!(
                    "- {{addresses: [\"10.244.200.{}\"], conditions: {{ready: true}}}}\n",
                    k + 1
                )
            })
            .collect();
        text.push_str(&format!("---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: svc-{i}-1\n  namespace: bench\n  labels: {{kubernetes.io/service-name: svc-{i}}}\naddressType: IPv4\nendpoints:\n{eps}ports:\n- {{name: http, port: 8080, protocol: TCP}}\n"));
    }
    std::fs::write(dir.join("a.yaml"), &text)?;
    std::fs::write(dir.join("b.yaml"), "apiVersion: v1\nkind: Service\nmetadata: {name: probe, namespace: bench}\nspec:\n  clusterIP: 10.111.0.1\n  ports:\n  - {name: http, port: 80}\n")?;
    let mut cache = manifests::ManifestCache::default();
    let mut translator = translate::Translator::default();
    let rss0 = || {
        std::fs::read_to_string("/proc/self/status")
            .unwrap()
            .lines()
            .find(|l| l.starts_with("VmRSS"))
            .unwrap()
            .to_string()
    };
    println!("start {}", rss0());
    let mut dp = Datapath::load_unpinned()?;
    println!("after datapath load {}", rss0());
    let opts = node::NodeOptions::default();
    for round in 0..3 {
        if round > 0 {
            std::fs::write(dir.join("c.yaml"), format!("apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: probe-1\n  namespace: bench\n  labels: {{kubernetes.io/service-name: probe}}\n  annotations: {{g: \"{round}\"}}\naddressType: IPv4\nendpoints:\n- {{addresses: [\"10.244.1.{round}\"]}}\nports:\n- {{name: http, port: 8080}}\n"))?;
        }
        let t0 = Instant::now();
        let (objects, _) = cache.load_dir(&dir)?;
        let t1 = Instant::now();
        let rss0 = || {
            std::fs::read_to_string("/proc/self/status")
                .unwrap()
                .lines()
                .find(|l| l.starts_with("VmRSS"))
                .unwrap()
                .to_string()
        };
        println!("after load {}", rss0());
        let ctx = node::resolve(&opts, &objects).unwrap();
        let t2 = Instant::now();
        let (desired, _) = translator.translate(&objects, &ctx);
        let t3 = Instant::now();
        println!("after translate {}", rss0());
        let (wire, _) = policy::program(&objects, &ctx);
        let t4 = Instant::now();
        let stats = dp.sync(&desired)?;
        let t5 = Instant::now();
        dp.sync_policy(&wire);
        let t6 = Instant::now();
        drop(objects);
        let t7 = Instant::now();
        let rss = || {
            std::fs::read_to_string("/proc/self/status")
                .unwrap()
                .lines()
                .find(|l| l.starts_with("VmRSS"))
                .unwrap()
                .to_string()
        };
        println!("{}", rss());
        unsafe { libc::malloc_trim(0) };
        println!("after trim {}", rss());
        println!("round {round}: load {:?} resolve {:?} translate {:?} policy {:?} sync {:?} (writes {}) sync_policy {:?} drop {:?}", t1-t0, t2-t1, t3-t2, t4-t3, t5-t4, stats.map_writes, t6-t5, t7-t6);
    }
    let status = std::fs::read_to_string("/proc/self/status")?;
    println!(
        "{}",
        status.lines().find(|l| l.starts_with("VmRSS")).unwrap()
    );
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
