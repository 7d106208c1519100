//! From a scenario's fault timeline and swarm rates to the exact faults a
//! run plays: sites picked by fraction are named, swarm faults are drawn,
//! and everything is sorted by time. The result, written back as a scenario
//! (`schedule.toml`), replays the same run.

use std::time::Duration;

use crate::rng::SimRng;
use crate::scenario::{Fault, FaultKind, Scenario, Swarm, region_name};

/// The exact faults of a run of `s` with `seed`, in the order they start.
pub fn expand(s: &Scenario, seed: u64) -> Vec<Fault> {
    let names = s.site_names();
    let per_region = s.topology.sites_per_region;
    let mut out = Vec::new();
    for (i, f) in s.faults.iter().enumerate() {
        let mut f = f.clone();
        if f.targets_sites() && (f.fraction.is_some() || !f.regions.is_empty()) {
            // Candidates: the named sites and those of the named regions;
            // all sites when only a fraction is given.
            let mut candidates: Vec<usize> = Vec::new();
            for (k, name) in names.iter().enumerate() {
                let region = region_name(k / per_region + 1);
                if f.sites.contains(name) || f.regions.contains(&region) {
                    candidates.push(k);
                }
            }
            if f.sites.is_empty() && f.regions.is_empty() {
                candidates = (0..names.len()).collect();
            }
            if let Some(fraction) = f.fraction {
                let k = ((candidates.len() as f64 * fraction).round() as usize)
                    .max(usize::from(fraction > 0.0))
                    .min(candidates.len());
                let mut rng = SimRng::derive(seed, "fault-targets", i as u64);
                let mut picked = Vec::new();
                rng.sample(candidates.len(), k, &mut picked);
                picked.sort_unstable();
                candidates = picked.into_iter().map(|p| candidates[p]).collect();
            }
            f.sites = candidates.into_iter().map(|k| names[k].clone()).collect();
            f.regions.clear();
            f.fraction = None;
        }
        out.push(f);
    }
    out.extend(swarm(s, seed, &names));
    out.sort_by(|a, b| {
        (a.at, a.kind, &a.sites, &a.hubs, &a.hub).cmp(&(b.at, b.kind, &b.sites, &b.hubs, &b.hub))
    });
    out
}

/// Random faults per site, a Poisson process per kind.
fn swarm(s: &Scenario, seed: u64, names: &[String]) -> Vec<Fault> {
    let w = &s.swarm;
    let end = s.duration.as_secs_f64();
    let mean_len = w.mean_duration.as_secs_f64().max(1.0);
    let nodes = s.topology.nodes_per_site;
    let mut out = Vec::new();
    for (kind, per_hour, label) in [
        (FaultKind::WanOutage, w.wan_flaps_per_site_hour, "swarm-wan"),
        (
            FaultKind::RelayCrash,
            w.relay_crashes_per_site_hour,
            "swarm-relay",
        ),
        (
            FaultKind::NodeCrash,
            w.node_crashes_per_site_hour,
            "swarm-node",
        ),
    ] {
        if per_hour <= 0.0 {
            continue;
        }
        let mean_gap = 3600.0 / per_hour;
        for (k, name) in names.iter().enumerate() {
            let mut rng = SimRng::derive(seed, label, k as u64);
            let mut t = rng.exp(mean_gap);
            while t < end {
                let len = rng.exp(mean_len).clamp(1.0, 6.0 * mean_len);
                // Whole milliseconds, so the schedule reads back exactly.
                let at = Duration::from_millis((t * 1000.0) as u64);
                let duration = Duration::from_millis((len * 1000.0) as u64);
                let mut f = Fault::on_sites(kind, at, duration, vec![name.clone()]);
                if kind == FaultKind::NodeCrash {
                    // One node of the site.
                    f.share = Some(1.0 / nodes as f64);
                }
                out.push(f);
                t += len + rng.exp(mean_gap);
            }
        }
    }
    out
}

/// `s` with exactly `faults` and no swarm: a scenario that replays the run.
pub fn replayable(s: &Scenario, faults: &[Fault]) -> Scenario {
    let mut r = s.clone();
    r.faults = faults.to_vec();
    r.swarm = Swarm {
        mean_duration: s.swarm.mean_duration,
        ..Swarm::default()
    };
    if !r.name.ends_with(" (schedule)") {
        r.name = format!("{} (schedule)", s.name);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: &str = r#"
        name = "t"
        duration = "10m"
        [topology]
        regions = 2
        hubs = 2
        sites_per_region = 10
        nodes_per_site = 5
        [[faults]]
        kind = "wan_outage"
        at = "1m"
        duration = "2m"
        fraction = 0.2
        [[faults]]
        kind = "relay_crash"
        at = "30s"
        duration = "10s"
        regions = ["r2"]
        fraction = 0.5
        [swarm]
        node_crashes_per_site_hour = 2.0
        mean_duration = "30s"
    "#;

    #[test]
    fn fractions_become_named_sites_drawn_from_the_seed() {
        let s = Scenario::parse(S, "t.toml").unwrap();
        let a = expand(&s, 1);
        let outage = a.iter().find(|f| f.kind == FaultKind::WanOutage).unwrap();
        assert_eq!(outage.sites.len(), 4);
        assert!(outage.fraction.is_none());
        let crash = a.iter().find(|f| f.kind == FaultKind::RelayCrash).unwrap();
        assert_eq!(crash.sites.len(), 5);
        assert!(crash.sites.iter().all(|s| s.starts_with("r2-")));
        assert_eq!(a, expand(&s, 1), "same seed, same faults");
        assert_ne!(a, expand(&s, 2));
        assert!(a.windows(2).all(|w| w[0].at <= w[1].at), "in time order");
        assert!(
            a.iter().any(|f| f.kind == FaultKind::NodeCrash),
            "swarm drawn"
        );
    }

    #[test]
    fn the_schedule_written_out_replays_the_same_faults() {
        let s = Scenario::parse(S, "t.toml").unwrap();
        let faults = expand(&s, 9);
        let text = toml::to_string(&replayable(&s, &faults)).unwrap();
        let back = Scenario::parse(&text, "schedule.toml").unwrap();
        assert_eq!(expand(&back, 9), faults);
        assert_eq!(expand(&back, 12345), faults, "nothing left to draw");
    }
}
