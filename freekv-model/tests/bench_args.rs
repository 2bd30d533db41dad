//! The host-side arithmetic of the `cuda_freekv` bench (`benches/support/cuda_freekv_args.rs`):
//! scenario lists, windows and the equal-position comparison of rows stopped at a time cap.

#[path = "../benches/support/cuda_freekv_args.rs"]
mod args;

use args::{
    Counters, DEFAULT_SCENARIOS, compared_ms, counter_windows, parse_scenarios, percentile,
    window_medians,
};
use serde_json::json;

#[test]
fn scenarios_parse_with_and_without_a_model() {
    let s = parse_scenarios(
        " long-input:32768:512 , long-generation:1024:64:llama-3.1-8b+persistent=0.92,",
    )
    .unwrap();
    assert_eq!(s.len(), 2);
    assert_eq!(
        (
            s[0].name.as_str(),
            s[0].context,
            s[0].generate,
            s[0].model.as_deref()
        ),
        ("long-input", 32768, 512, None)
    );
    assert_eq!(s[1].model.as_deref(), Some("llama-3.1-8b+persistent=0.92"));
    // The defaults: both scenarios on plain weights and on the two calibrated models.
    let d = parse_scenarios(DEFAULT_SCENARIOS).unwrap();
    assert_eq!(d.len(), 4);
    assert_eq!(d.iter().filter(|s| s.model.is_some()).count(), 2);
}

#[test]
fn bad_scenarios_are_errors_naming_the_entry() {
    for bad in [
        "long-input:32768",
        "long-input:x:512",
        "a:1:2:m:extra",
        "long-input:1:-3",
    ] {
        let e = parse_scenarios(bad).err().unwrap_or_default();
        assert!(e.contains(bad), "{bad}: {e}");
    }
}

#[test]
fn windows_are_medians_of_whole_windows() {
    let t: Vec<f64> = (0..10).map(f64::from).collect();
    assert_eq!(window_medians(&t, 4), vec![2.0, 6.0]);
    assert!(window_medians(&t, 11).is_empty());
    assert!(window_medians(&t, 0).is_empty());
    assert_eq!(percentile(&[3.0, 1.0, 2.0], 0.5), 2.0);
    assert!(percentile(&[], 0.5).is_nan());
}

#[test]
fn counter_windows_are_per_step_deltas() {
    let mib = 1u64 << 20;
    let c = |r: u64, k: u64, checked: u64, flagged: u64| Counters {
        recall_bytes: r * mib,
        corrective_bytes: k * mib,
        heads_checked: checked,
        heads_flagged: flagged,
    };
    let base = c(100, 40, 1000, 500);
    // Window 1: 256 MiB over 128 steps (2 MiB/step), 64 corrective, 3 of 4 heads flagged;
    // window 2: nothing checked; window 3: a reset counter counts as 0.
    let ends = [
        c(356, 104, 1004, 503),
        c(356, 104, 1004, 503),
        c(10, 5, 0, 0),
    ];
    let (recall, corrective, rate) = counter_windows(base, &ends, 128);
    assert_eq!(recall, vec![2.0, 0.0, 0.0]);
    assert_eq!(corrective, vec![0.5, 0.0, 0.0]);
    assert_eq!(rate, vec![0.75, 0.0, 0.0]);
    assert_eq!(counter_windows(base, &[], 128), (vec![], vec![], vec![]));
}

#[test]
fn rows_stopped_early_compare_at_equal_positions() {
    let row = |steps: u64, median: f64, wins: &[f64]| json!({"steps_measured": steps, "ms_median": median, "ms_windows": wins, "window_steps": 256});
    let freekv = row(1024, 8.0, &[5.0, 7.0, 10.0, 11.0]);
    // arkvale stopped after 3 windows: window 3 against window 3.
    let arkvale = row(768, 9.0, &[6.0, 10.0, 40.0]);
    assert_eq!(compared_ms(&freekv, &arkvale), Some((10.0, 40.0)));
    // As many steps: the last window too (the end of the generation, not the medians 8 / 7).
    let oracle = row(1024, 7.0, &[5.0, 6.0, 8.0, 9.0]);
    assert_eq!(compared_ms(&freekv, &oracle), Some((11.0, 9.0)));
    // No whole window in one of them: the medians.
    let short = row(100, 30.0, &[]);
    assert_eq!(compared_ms(&freekv, &short), Some((8.0, 30.0)));
    // Windows of another size: the medians.
    let mut other = oracle.clone();
    other["window_steps"] = json!(128);
    assert_eq!(compared_ms(&freekv, &other), Some((8.0, 7.0)));
}

#[test]
fn policies_parse_with_tau_and_modifiers() {
    let p = args::parse_policy("freekv@0.9~serial~cb16~gb4~sp12~pf").unwrap();
    assert!(p.spare_prefetch);
    assert!(!p.speculate_corrected);
    assert!(
        args::parse_policy("freekv~specall")
            .unwrap()
            .speculate_corrected
    );
    assert_eq!(p.base, "freekv");
    assert_eq!(p.tau.as_deref(), Some("0.9"));
    assert_eq!(p.overlap, Some(false));
    assert_eq!(
        args::parse_policy("freekv~overlap").unwrap().overlap,
        Some(true)
    );
    assert_eq!((p.correction_blocks, p.gather_blocks), (Some(16), Some(4)));
    assert_eq!(p.spare_pages, Some(12));
    assert_eq!(
        args::parse_policy("freekv~sp0").unwrap().spare_pages,
        Some(0)
    );
    assert_eq!(
        args::parse_policy("freekv~rs8").unwrap().reserve_sms,
        Some(8)
    );
    assert_eq!(args::parse_policy("freekv").unwrap().reserve_sms, None);
    let p = args::parse_policy(" oracle ").unwrap();
    assert_eq!(
        (p.base.as_str(), p.tau, p.overlap, p.correction_blocks),
        ("oracle", None, None, None)
    );
    for bad in [
        "freekv~cb0",
        "freekv~cb",
        "freekv~fast",
        "~serial",
        "@0.9",
        "freekv~gbx",
        "freekv~fs2",
        "freekv~sp",
        "freekv~sp-1",
        "freekv~rs",
        "freekv~rsx",
    ] {
        let e = args::parse_policy(bad).unwrap_err();
        assert!(e.contains("policy"), "{bad}: {e}");
    }
}
