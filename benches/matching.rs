//! Per-dispatch cost of requirement-aware matching as the fleet and the number of requirement
//! classes grow: 10 / 1,000 / 10,000 registered workers × 1 / 100 / 1,000 classes.
//!
//!   cargo bench --bench matching
//!
//! One dispatch = a task with requirements is added to a queue and taken by a worker that
//! satisfies them. Every class also keeps one task waiting that the dispatching worker cannot take,
//! so the matcher has to look past other classes' backlog. Target: the 10,000-worker, 1,000-class
//! cost within 2× of the 10-worker, 1-class cost.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use std::hint::black_box;
use tether::api::pb::Capabilities;
use tether::server::matching::{Matcher, QueueKey, TaskKind, TaskRef};

fn setup(workers: usize, classes: usize) -> (Matcher, QueueKey) {
    let m = Matcher::default();
    let key = QueueKey::new("default", "q", TaskKind::Activity);
    for i in 0..workers {
        let mut caps = Capabilities::default();
        caps.labels
            .insert("team".into(), format!("t{}", i % classes));
        caps.labels.insert("busy".into(), "no".into());
        m.register("default", &format!("w{i}"), caps, vec!["q".into()], 10, 0);
    }
    // A waiting task per class that no worker can take (nobody is busy=yes).
    for c in 0..classes {
        m.add(
            &key,
            TaskRef::Activity {
                run_id: format!("stuck-{c}").into(),
                scheduled_event_id: 0,
                attempt: 1,
            },
            &format!("label.busy=yes, label.team=t{c}"),
        );
    }
    (m, key)
}

fn dispatch(c: &mut Criterion) {
    let mut group = c.benchmark_group("dispatch");
    for workers in [10usize, 1_000, 10_000] {
        for classes in [1usize, 100, 1_000] {
            let (m, key) = setup(workers, classes);
            let requirements: Vec<String> =
                (0..classes).map(|c| format!("label.team=t{c}")).collect();
            let identities: Vec<String> = (0..workers).map(|i| format!("w{i}")).collect();
            let mut n = 0usize;
            group.bench_with_input(
                BenchmarkId::new(format!("{workers}w"), format!("{classes}c")),
                &(workers, classes),
                |b, _| {
                    b.iter(|| {
                        n += 1;
                        let worker = n % workers;
                        let class = worker % classes;
                        m.add(
                            &key,
                            TaskRef::Activity {
                                run_id: "r".into(),
                                scheduled_event_id: n as u64,
                                attempt: 1,
                            },
                            &requirements[class],
                        );
                        let got = m.try_take(&key, &identities[worker], 0);
                        black_box(got.expect("the worker satisfies the class"));
                    })
                },
            );
        }
    }
    group.finish();
}

criterion_group! {
    name = benches;
    // Warm-up long enough that every worker has met every class once (the one-time evaluation
    // that the cache then saves), so the figures are the steady-state dispatch cost.
    config = Criterion::default()
        .warm_up_time(std::time::Duration::from_secs(3))
        .measurement_time(std::time::Duration::from_secs(3));
    targets = dispatch
}
criterion_main!(benches);
