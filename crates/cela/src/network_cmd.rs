//! `cela network create|ls|inspect|rm`: named networks (see
//! `cela_instance::network::named`), which `cela run --net NAME` joins.

use std::path::Path;
use std::process::ExitCode;

use cela_instance::network::named::{CreateRequest, Networks};
use clap::Subcommand;

use crate::image_cmd::Format;

#[derive(Subcommand, Debug)]
pub enum NetworkCommand {
    /// Make a network: a bridge with a subnet that instances join with `cela run --net NAME`.
    Create {
        /// The subnet, A.B.C.D/PREFIX (default: a free /24 of 10.214.0.0/16).
        #[arg(long, value_name = "CIDR")]
        subnet: Option<String>,
        /// The bridge's address, the instances' gateway (default: the subnet's first).
        #[arg(long, value_name = "IP")]
        gateway: Option<String>,
        /// No way to the host or beyond: the instances reach only each other.
        #[arg(long)]
        internal: bool,
        /// A way beyond the host: traffic leaving it is masqueraded (as Docker's bridge).
        #[arg(long)]
        nat: bool,
        name: String,
    },
    /// List networks.
    Ls {
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Print networks' records (subnet, bridge, instances on them) as JSON.
    Inspect {
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Join a running container to a network now (and on its later starts), as its next ethN.
    Connect {
        /// `NAME[,ip=ADDR][,mac=MAC]`, as `cela run --net` takes it.
        network: String,
        instance: String,
    },
    /// Take a container off a network (now, if it runs, and for good).
    Disconnect { network: String, instance: String },
    /// Remove networks no instance runs on.
    Rm {
        #[arg(required = true)]
        names: Vec<String>,
    },
}

pub fn network(cmd: NetworkCommand, data_dir: &Path) -> anyhow::Result<ExitCode> {
    let nets = Networks::open(data_dir)?;
    match cmd {
        NetworkCommand::Create {
            subnet,
            gateway,
            internal,
            nat,
            name,
        } => {
            let net = nets.create(&CreateRequest {
                name,
                subnet,
                gateway,
                internal,
                nat,
            })?;
            out!("{}", net.id);
        }
        NetworkCommand::Ls { format } => {
            let list = nets.list()?;
            match format {
                Format::Json => out!("{}", serde_json::to_string_pretty(&list)?),
                Format::Table => {
                    out!(
                        "{:<12}  {:<24} {:<18} {:<15} {:<8} {:>9}",
                        "ID",
                        "NAME",
                        "SUBNET",
                        "GATEWAY",
                        "MODE",
                        "INSTANCES"
                    );
                    for n in list {
                        let mode = if n.internal {
                            "internal"
                        } else if n.nat {
                            "nat"
                        } else {
                            "host"
                        };
                        out!(
                            "{:<12}  {:<24} {:<18} {:<15} {:<8} {:>9}",
                            n.id,
                            n.name,
                            n.subnet,
                            if n.internal {
                                "-".to_owned()
                            } else {
                                n.gateway.to_string()
                            },
                            mode,
                            n.endpoints.len()
                        );
                    }
                }
            }
        }
        NetworkCommand::Connect { network, instance } => {
            let inst = crate::instance_cmd::instances(data_dir)?.find(&instance)?;
            let att = cela_instance::network::named::Attachment::parse(&network)?;
            nets.connect(&inst, att)?;
        }
        NetworkCommand::Disconnect { network, instance } => {
            let inst = crate::instance_cmd::instances(data_dir)?.find(&instance)?;
            nets.disconnect(&inst, &network)?;
        }
        NetworkCommand::Inspect { names } => {
            let list = names
                .iter()
                .map(|n| nets.get(n))
                .collect::<Result<Vec<_>, _>>()?;
            out!("{}", serde_json::to_string_pretty(&list)?);
        }
        NetworkCommand::Rm { names } => {
            let mut failed = None;
            for name in &names {
                match nets.remove(name) {
                    Ok(()) => out!("{name}"),
                    Err(e) => {
                        eprintln!("cela: error: {e}");
                        failed = Some(e);
                    }
                }
            }
            if failed.is_some() {
                return Ok(ExitCode::from(crate::EXIT_CELA_ERROR));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
