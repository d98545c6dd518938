//! The per-pipeline metrics of a running operator agree with the pipeline's status: what the
//! PrometheusRule's PortcullisPipelineNotReady and the dashboard read.

mod support;

use support::{WAIT, condition, wait_for, with_pipeline};

#[tokio::test]
async fn pipeline_ready_and_denied_gauges_follow_the_status() {
    let f = with_pipeline("metrics", "examples/pipelines/rag-assistant.yaml").await;
    let name = f.pipeline.metadata.name.clone().unwrap();
    let series = format!("{{namespace=\"{}\",pipeline=\"{name}\"}}", f.ns);
    // Whatever the operator concludes, the gauges say the same as the status it wrote.
    let (ready, denied) = wait_for("the status and the gauges to agree", WAIT, || {
        let (client, ns, name, series, op) = (&f.client, &f.ns, &name, &series, &f.op);
        async move {
            let live = kube::Api::<portcullis::api::AIPipeline>::namespaced(client.clone(), ns)
                .get(name)
                .await
                .ok()?;
            let status = live.status.as_ref()?;
            let ready = condition(&live, "Ready")?.status == "True";
            let metrics = op.http_get("/metrics").await;
            let value = |metric: &str| {
                metrics
                    .lines()
                    .find(|l| l.starts_with(&format!("{metric}{series} ")))
                    .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            };
            let gauge_ready = value("portcullis_pipeline_ready")?;
            let gauge_denied = value("portcullis_pipeline_denied_items")?;
            (gauge_ready == f64::from(u8::from(ready)) && gauge_denied == f64::from(status.denied))
                .then_some((ready, status.denied))
        }
    })
    .await;
    eprintln!("ready {ready}, denied {denied}");
    assert!(f.op.http_get("/metrics").await.contains(&format!(
        "portcullis_build_info{{version=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION")
    )));
}
