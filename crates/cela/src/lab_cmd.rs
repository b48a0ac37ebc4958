//! `cela lab up|down|ls|inspect|graph|impair`: labs (see `cela_instance::lab`), and the
//! hidden `cela __link-relay` that carries an impaired link's frames.

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use cela_instance::lab::impair::{self, Impairment};
use cela_instance::lab::{Lab, Labs, file::LabFile};
use clap::{Subcommand, ValueEnum};
use serde_json::json;

use crate::image_cmd::Format;

#[derive(Subcommand, Debug)]
pub enum LabCommand {
    /// Bring up every node, network and link of a lab file (all of it, or none).
    Up {
        /// The lab file (YAML, shaped as containerlab's .clab.yml; see the README).
        file: PathBuf,
        /// The lab's name, instead of the file's `name`.
        #[arg(long)]
        name: Option<String>,
    },
    /// Take labs down: their nodes, links, relays and networks.
    Down {
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// List labs.
    Ls {
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Print a lab's nodes, links and networks as JSON, with each node's state.
    Inspect { name: String },
    /// Draw a lab's topology: `cela lab graph LAB > lab.svg`.
    Graph {
        name: String,
        #[arg(long, value_enum, default_value_t = GraphFormat::Svg)]
        format: GraphFormat,
    },
    /// Impair a running lab's link, both ways (each call sets the link's impairment anew).
    Impair {
        name: String,
        /// Either end of the link, NODE:IFACE.
        end: String,
        /// Delay added to each frame, e.g. 50 (ms), 50ms, 1s.
        #[arg(long, value_name = "MS")]
        delay: Option<String>,
        /// The delay varies by up to this much either way.
        #[arg(long, value_name = "MS", requires = "delay")]
        jitter: Option<String>,
        /// Frames lost, e.g. 1 or 0.5% (percent).
        #[arg(long, value_name = "PCT")]
        loss: Option<String>,
        /// Bandwidth, e.g. 10 (Mbit/s), 512kbit, 1gbit.
        #[arg(long, value_name = "MBIT")]
        rate: Option<String>,
        /// Remove every impairment: the link is a plain wire again.
        #[arg(long, conflicts_with_all = ["delay", "jitter", "loss", "rate"])]
        clear: bool,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum GraphFormat {
    Svg,
    Dot,
}

/// The lab file's text: a regular file, read bounded.
fn read_file(path: &Path) -> anyhow::Result<String> {
    let f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    if !f.metadata()?.is_file() {
        bail!("{} is not a regular file", path.display());
    }
    let mut text = String::new();
    f.take(cela_instance::lab::file::MAX_FILE + 1)
        .read_to_string(&mut text)
        .with_context(|| format!("reading {}", path.display()))?;
    Ok(text)
}

fn view(labs: &Labs, lab: &Lab) -> serde_json::Value {
    let instances = labs.instances(lab);
    let up = labs.links_up(lab);
    let nodes: Vec<_> = lab
        .plan
        .nodes
        .iter()
        .map(|n| {
            let inst = instances.get(&n.name);
            json!({
                "name": n.name,
                "kind": n.kind,
                "image": n.image,
                "instance": lab.instance_name(&n.name),
                "id": lab.nodes.get(&n.name),
                "status": inst
                    .and_then(|i| i.state().ok())
                    .map_or("missing".to_owned(), |s| s.status.to_string()),
                "networks": n.networks,
            })
        })
        .collect();
    let links: Vec<_> = lab
        .plan
        .links
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let state = lab.links.get(i);
            let ends: Vec<_> = l
                .ends
                .iter()
                .map(|e| {
                    json!({
                        "node": e.node,
                        "interface": e.iface,
                        "address": e.address.map(|(a, p)| format!("{a}/{p}")),
                    })
                })
                .collect();
            let impair = state.map_or(l.impair, |s| s.impair);
            json!({
                "ends": ends,
                "lab_ends": state.map(|_| cela_instance::lab::link::lab_ends(i)),
                // Both ends exist (a node that stopped or restarted took its links along).
                "up": up.get(i).copied().unwrap_or(false),
                "impair": impair,
                "impairment": impair.describe(),
                "relay": state.and_then(|s| s.relay).map(|r| json!({"pid": r.pid, "alive": r.alive()})),
            })
        })
        .collect();
    json!({
        "name": lab.name,
        "id": lab.id,
        "created": lab.created,
        "complete": lab.complete,
        "nodes": nodes,
        "links": links,
        "networks": lab.networks,
    })
}

pub fn lab(cmd: LabCommand, data_dir: &Path) -> anyhow::Result<ExitCode> {
    let labs = Labs::open(data_dir)?;
    match cmd {
        LabCommand::Up { file, name } => {
            let text = read_file(&file)?;
            let plan = LabFile::parse(&text)
                .and_then(|f| f.plan(name.as_deref()))
                .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            let store = crate::image_cmd::open(data_dir)?;
            let lab = labs.up(&store, plan, &crate::image_cmd::progress())?;
            out!(
                "lab {} is up: {} nodes, {} links, {} networks",
                lab.name,
                lab.plan.nodes.len(),
                lab.plan.links.len(),
                lab.networks.len()
            );
            for n in &lab.plan.nodes {
                out!(
                    "  {:<20} {:<9} {}",
                    lab.instance_name(&n.name),
                    n.kind,
                    n.image
                );
            }
        }
        LabCommand::Down { names } => {
            let mut failed = false;
            for name in &names {
                match labs.down(name) {
                    Ok(()) => out!("{name}"),
                    Err(e) => {
                        eprintln!("cela: error: {e}");
                        failed = true;
                    }
                }
            }
            if failed {
                return Ok(ExitCode::from(crate::EXIT_CELA_ERROR));
            }
        }
        LabCommand::Ls { format } => {
            let list = labs.list()?;
            match format {
                Format::Json => {
                    let views: Vec<_> = list.iter().map(|l| view(&labs, l)).collect();
                    out!("{}", serde_json::to_string_pretty(&views)?);
                }
                Format::Table => {
                    out!(
                        "{:<20} {:>5} {:>7} {:>5} {:>9}  CREATED",
                        "NAME",
                        "NODES",
                        "RUNNING",
                        "LINKS",
                        "IMPAIRED"
                    );
                    for l in list {
                        let running = labs
                            .instances(&l)
                            .values()
                            .filter(|i| {
                                i.state()
                                    .is_ok_and(|s| s.status == cela_instance::Status::Running)
                            })
                            .count();
                        let impaired = l.links.iter().filter(|s| !s.impair.is_none()).count();
                        out!(
                            "{:<20} {:>5} {:>7} {:>5} {:>9}  {}{}",
                            l.name,
                            l.plan.nodes.len(),
                            running,
                            l.plan.links.len(),
                            impaired,
                            l.created,
                            if l.complete { "" } else { "  (incomplete)" }
                        );
                    }
                }
            }
        }
        LabCommand::Inspect { name } => {
            let lab = labs.get(&name)?;
            out!("{}", serde_json::to_string_pretty(&view(&labs, &lab))?);
        }
        LabCommand::Graph { name, format } => {
            let lab = labs.get(&name)?;
            let text = match format {
                GraphFormat::Svg => cela_instance::lab::graph::svg(&lab),
                GraphFormat::Dot => cela_instance::lab::graph::dot(&lab),
            };
            crate::write_out(format_args!("{text}"));
        }
        LabCommand::Impair {
            name,
            end,
            delay,
            jitter,
            loss,
            rate,
            clear,
        } => {
            if !clear && delay.is_none() && loss.is_none() && rate.is_none() {
                bail!("say what to do to the link: --delay, --loss, --rate, or --clear");
            }
            let parse = |v: Option<String>, f: fn(&str) -> Result<u64, String>| {
                v.map(|v| f(&v)).transpose().map(Option::unwrap_or_default)
            };
            let impair = Impairment {
                delay_us: parse(delay, impair::parse_duration).map_err(anyhow::Error::msg)?,
                jitter_us: parse(jitter, impair::parse_duration).map_err(anyhow::Error::msg)?,
                loss_ppm: parse(loss, impair::parse_loss).map_err(anyhow::Error::msg)?,
                rate_bps: parse(rate, impair::parse_rate).map_err(anyhow::Error::msg)?,
            };
            labs.impair(&name, &end, impair)?;
            out!("{name} {end}: {}", impair.describe());
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `cela __link-relay A B --delay-us N …`: runs until killed.
pub fn relay(args: RelayArgs) -> anyhow::Result<ExitCode> {
    let impair = Impairment {
        delay_us: args.delay_us,
        jitter_us: args.jitter_us,
        loss_ppm: args.loss_ppm,
        rate_bps: args.rate_bps,
    };
    impair.check().map_err(anyhow::Error::msg)?;
    cela_instance::lab::relay::run(&args.netns, &args.a, &args.b, impair)
        .with_context(|| format!("relaying between {} and {}", args.a, args.b))?;
    Ok(ExitCode::SUCCESS)
}

#[derive(clap::Args, Debug)]
pub struct RelayArgs {
    /// The lab's network namespace (its bind mount).
    #[arg(long)]
    netns: PathBuf,
    a: String,
    b: String,
    #[arg(long, default_value_t = 0)]
    delay_us: u64,
    #[arg(long, default_value_t = 0)]
    jitter_us: u64,
    #[arg(long, default_value_t = 0)]
    loss_ppm: u64,
    #[arg(long, default_value_t = 0)]
    rate_bps: u64,
}
