use serde::Deserialize;
use std::time::Instant;
fn main() {
    let n = 10_000;
    let mut text = String::new();
    for i in 0..n {
        text.push_str(&format!("---\napiVersion: v1\nkind: Service\nmetadata: {{name: svc-{i}, namespace: bench}}\nspec:\n  clusterIP: 10.96.{}.{}\n  ports:\n  - {{name: http, port: 80, targetPort: 8080}}\n", i / 250, i % 250));
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
    let t0 = Instant::now();
    let values: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde_yaml::Value::deserialize(d).unwrap())
        .collect();
    let t1 = Instant::now();
    let mut k = 0;
    for v in values {
        if v.get("kind").and_then(|k| k.as_str()) == Some("Service") {
            let _s: k8s_openapi::api::core::v1::Service = serde_yaml::from_value(v).unwrap();
        } else {
            let _s: k8s_openapi::api::discovery::v1::EndpointSlice =
                serde_yaml::from_value(v).unwrap();
        }
        k += 1;
    }
    let t2 = Instant::now();
    let json: Vec<serde_json::Value> = serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde_json::Value::deserialize(d).unwrap())
        .collect();
    let t3 = Instant::now();
    for v in json {
        if v.get("kind").and_then(|k| k.as_str()) == Some("Service") {
            let _s: k8s_openapi::api::core::v1::Service = serde_json::from_value(v).unwrap();
        } else {
            let _s: k8s_openapi::api::discovery::v1::EndpointSlice =
                serde_json::from_value(v).unwrap();
        }
    }
    let t4 = Instant::now();
    println!(
        "{k} docs: yaml->Value {:?}, Value->typed {:?}; yaml->json Value {:?}, json->typed {:?}",
        t1 - t0,
        t2 - t1,
        t3 - t2,
        t4 - t3
    );
}
