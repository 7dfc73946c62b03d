//! `jvpn-loadtest report FILE.json --html OUT.html`: one self-contained page
//! that headless Chromium (Debian's, installed by `.ci/run`) renders with
//! data in every chart and no script error.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

async fn tool(args: &[&std::ffi::OsStr]) -> std::process::Output {
    common::loadtest(args, Duration::from_secs(180)).await
}

async fn chromium(args: &[&str], page: &std::path::Path) -> std::process::Output {
    let mut all: Vec<String> = vec!["--enable-logging=stderr".into()];
    all.extend(args.iter().map(|a| (*a).to_owned()));
    all.push(format!("file://{}", page.display()));
    common::chromium(&all, Duration::from_secs(120)).await
}

/// `run` of `scenario` on a 2-gateway local cluster, 20 sessions at 40/s
/// for 2 s, with `extra` arguments, its report written to `json`.
async fn run_small(json: &std::path::Path, scenario: &str, extra: &[&str]) -> std::process::Output {
    let base = [
        "run",
        "--local-cluster",
        "2",
        "--scenario",
        scenario,
        "--sessions",
        "20",
        "--rate",
        "40",
        "--duration-s",
        "2",
    ];
    let mut args: Vec<&std::ffi::OsStr> = base.iter().chain(extra).map(|a| a.as_ref()).collect();
    args.extend(["--json".as_ref(), json.as_os_str()]);
    tool(&args).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_html_report_renders_every_chart_with_data() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("storm.json");
    let html = dir.path().join("storm.html");
    let out = run_small(&json, "storm", &[]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = tool(&[
        "report".as_ref(),
        json.as_os_str(),
        "--html".as_ref(),
        html.as_os_str(),
    ])
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let page = std::fs::read_to_string(&html).unwrap();
    // Self-contained: nothing fetched, nothing executed.
    assert!(!page.contains("http://") && !page.contains("https://"));
    assert!(!page.contains("<script"));

    let dom = chromium(&["--dump-dom"], &html).await;
    assert!(dom.status.success());
    let dom_text = String::from_utf8_lossy(&dom.stdout);
    let log = String::from_utf8_lossy(&dom.stderr);
    assert!(!log.contains("Uncaught"), "{log}");
    for id in [
        "hist-handshake",
        "hist-resume",
        "hist-echo",
        "hist-recovery",
    ] {
        let at = dom_text
            .find(&format!("id=\"{id}\""))
            .unwrap_or_else(|| panic!("{id} not rendered"));
        let chart = &dom_text[at..at + dom_text[at..].find("</svg>").unwrap()];
        assert!(chart.contains("class=\"bar\""), "{id} has no data");
    }
    let at = dom_text.find("id=\"timeline\"").unwrap();
    let timeline = &dom_text[at..at + dom_text[at..].find("</svg>").unwrap()];
    assert!(
        timeline.contains("span up") && timeline.contains("span lost"),
        "{timeline}"
    );
    // A time axis under the sessions, in seconds from the run's start.
    assert!(
        timeline.matches("class=\"tick time-tick\"").count() >= 2 && timeline.contains(">0 s<"),
        "{timeline}"
    );
    // The verdict, then the run's context and its errors by reason.
    assert!(dom_text.contains("class=\"verdict pass\""), "no verdict");
    let at = dom_text.find("id=\"context\"").expect("no context table");
    let context = &dom_text[at..at + dom_text[at..].find("</table>").unwrap()];
    for k in [
        "target",
        "local cluster: 2 gateways",
        "started (UTC)",
        "storm",
        "arrivals achieved",
    ] {
        assert!(context.contains(k), "{k} missing from {context}");
    }
    assert!(dom_text.contains("id=\"errors\""), "no errors section");
    // Numbers for people: no float noise like 12.345678901.
    assert!(
        !dom_text.split(['<', '>']).any(|t| t.len() > 8
            && t.contains('.')
            && t.chars().all(|c| c.is_ascii_digit() || c == '.')),
        "unformatted numbers"
    );

    let png = dir.path().join("storm.png");
    let shot = chromium(
        &[
            &format!("--screenshot={}", png.display()),
            "--window-size=800,2000",
        ],
        &html,
    )
    .await;
    assert!(shot.status.success());
    assert!(
        std::fs::metadata(&png).unwrap().len() > 10_000,
        "blank page?"
    );

    // A file that is not a run report is refused, not rendered.
    std::fs::write(dir.path().join("bad.json"), "{}").unwrap();
    let out = tool(&[
        "report".as_ref(),
        dir.path().join("bad.json").as_os_str(),
        "--html".as_ref(),
        dir.path().join("bad.html").as_os_str(),
    ])
    .await;
    assert_eq!(out.status.code(), Some(2));
}

/// A failover run: the recovery chart shows the re-handshake recoveries
/// (they were left out, so the chart ended at 1.5 s while the timeline
/// showed 15 s gaps), the page says FAIL in red when a threshold fails, and
/// lists the errors by reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_html_report_shows_rehandshake_recoveries_and_a_failed_verdict() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("failover.json");
    let html = dir.path().join("failover.html");
    let out = run_small(&json, "failover", &["--threshold", "rehandshakes<1"]).await;
    assert_eq!(out.status.code(), Some(1), "the threshold fails the run");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let rehandshakes = v["rehandshakes"].as_u64().unwrap();
    assert!(rehandshakes > 0, "{v}");
    let out = tool(&[
        "report".as_ref(),
        json.as_os_str(),
        "--html".as_ref(),
        html.as_os_str(),
    ])
    .await;
    assert!(out.status.success());
    let dom = chromium(&["--dump-dom"], &html).await;
    let dom_text = String::from_utf8_lossy(&dom.stdout);
    let at = dom_text.find("id=\"hist-recovery\"").unwrap();
    let chart = &dom_text[at..at + dom_text[at..].find("</svg>").unwrap()];
    assert!(
        chart.contains("class=\"bar part\""),
        "no re-handshake recoveries: {chart}"
    );
    let drawn: u64 = chart
        .split("class=\"bar part\"")
        .skip(1)
        .filter_map(|b| {
            let t = &b[b.find("<title>")? + 7..b.find("</title>")?];
            t.split(": ")
                .nth(1)?
                .split(' ')
                .next()?
                .replace(',', "")
                .parse::<u64>()
                .ok()
        })
        .sum();
    assert_eq!(drawn, rehandshakes, "every re-handshake recovery is drawn");
    let at = dom_text.find("id=\"verdict\"").unwrap();
    let verdict = &dom_text[at..at + dom_text[at..].find("</div>").unwrap()];
    assert!(
        verdict.contains("verdict fail") && verdict.contains("rehandshakes&lt;1"),
        "{verdict}"
    );
    let at = dom_text.find("id=\"errors\"").unwrap();
    let errors = &dom_text[at..at + dom_text[at..].find("</table>").unwrap()];
    assert!(errors.contains("owner_"), "{errors}");
}
