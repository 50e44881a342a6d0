//! `tether caps`: what this machine would advertise as a worker.

use crate::args::CapsArgs;
use crate::args::Global;
use crate::render::caps_json;
use crate::render::caps_lines;
use crate::render::show;
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
    let mut text = Vec::new();
    text.extend(caps_lines(&caps));
    show(g, caps_json(&caps), text);
    Ok(0)
}
