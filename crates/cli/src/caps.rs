//! `tether caps`: what this machine would advertise as a worker.

use crate::args::CapsArgs;
use crate::args::Global;
use crate::render::caps_json;
use crate::render::print_caps;
use crate::render::print_json;
use anyhow::Result;

pub(crate) async fn caps_cmd(g: &Global, args: CapsArgs) -> Result<i32> {
    let mut source = tether_sdk::caps::CapabilitySource::detect().work_dir(args.work_dir);
    if let Some(path) = &args.inventory {
        source = source.with_inventory(tether_sdk::caps::Inventory::load(path)?);
    }
    for (k, v) in args.labels {
        source = source.label(k, v);
    }
    for (k, n) in args.resources {
        source = source.resource(k, n);
    }
    let caps = tokio::task::spawn_blocking(move || source.snapshot()).await?;
    if g.json {
        print_json(&caps_json(&caps));
    } else {
        print_caps(&caps);
    }
    Ok(0)
}
