//! .github/workflows/release.yml is not run from this repository (it says so at its top); this
//! checks what can be checked here: it parses, and its parts agree with each other and with the
//! repository (the Dockerfile it builds, the platforms the krew manifest lists, the chart it
//! packages).

use std::collections::BTreeSet;
use std::path::PathBuf;

use serde_json::Value;

fn read(path: &str) -> String {
    std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(path))
        .unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[test]
fn the_release_workflow_is_marked_not_run_and_its_parts_agree() {
    let text = read(".github/workflows/release.yml");
    assert!(
        text.starts_with("# NOT RUN HERE."),
        "the workflow says at its top that it was never run"
    );
    let workflow: Value = serde_saphyr::from_str(&text).expect("the workflow is YAML");
    let jobs = workflow["jobs"].as_object().expect("jobs");
    let names: BTreeSet<&str> = jobs.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        BTreeSet::from(["test", "binaries", "image", "chart", "krew", "release"])
    );

    // The binaries built are the platforms the krew manifest lists, and the image's two.
    let built: BTreeSet<(String, String)> = jobs["binaries"]["strategy"]["matrix"]["include"]
        .as_array()
        .expect("a matrix")
        .iter()
        .map(|m| {
            (
                m["os"].as_str().unwrap().to_string(),
                m["arch"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let krew = jobs["krew"]["steps"][1]["run"]
        .as_str()
        .expect("the krew step");
    for (os, arch) in &built {
        assert!(
            krew.contains(&format!("(\"{os}\", \"{arch}\")")),
            "the krew manifest lists {os}/{arch}"
        );
    }
    let image_steps = jobs["image"]["steps"].as_array().unwrap();
    let push = image_steps
        .iter()
        .find(|s| {
            s["uses"]
                .as_str()
                .is_some_and(|u| u.starts_with("docker/build-push-action"))
        })
        .expect("the image is built and pushed");
    assert_eq!(push["with"]["file"], "Dockerfile");
    assert_eq!(push["with"]["platforms"], "linux/amd64,linux/arm64");
    for arch in ["amd64", "arm64"] {
        assert!(built.contains(&("linux".to_string(), arch.to_string())));
    }
    // The Dockerfile copies the per-architecture root filesystem the image job lays out.
    assert!(read("Dockerfile").contains("COPY rootfs-${TARGETARCH}/ /"));
    assert!(text.contains("context/rootfs-${arch}"));

    // The chart job rewrites lines that exist in values.yaml.
    let values = read("charts/portcullis/values.yaml");
    assert!(values.contains("\n  repository: ") && values.contains("\n  digest: \"\"\n"));

    // The release carries checksums.
    let release = jobs["release"]["steps"].to_string();
    assert!(release.contains("SHA256SUMS"));
}
