//! `memtrace check`: what this kernel and this libc give memtrace, without tracing anything.
//! The kernel features, whether every BPF program passes the verifier, and where each
//! allocator probe would sit. `cargo xtask vm-test` runs it on every kernel of its matrix.
use std::{path::PathBuf, process::ExitCode};

use anyhow::{Context, Result};
use clap::Args;

use crate::{
    cli::Format,
    features::{self, Feature},
    tracer::{self, PlannedProbe, Tracer, TracerOptions},
};

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Output format.
    #[arg(long, env = "MEMTRACE_FORMAT", value_enum, default_value_t = Format::Table)]
    pub format: Format,

    /// The C library whose probe placement to show (default: memtrace's own).
    #[arg(long, env = "MEMTRACE_LIBC")]
    pub libc: Option<PathBuf>,
}

/// Everything `memtrace check` finds.
#[derive(Debug, serde::Serialize)]
pub struct CheckReport {
    pub kernel: String,
    pub features: Vec<Feature>,
    /// Each BPF program and the verifier's verdict (`None`: loaded).
    pub programs: Vec<ProgramCheck>,
    pub libc: PathBuf,
    pub probes: Vec<PlannedProbe>,
}

#[derive(Debug, serde::Serialize)]
pub struct ProgramCheck {
    pub name: String,
    pub loaded: bool,
    pub error: Option<String>,
}

impl CheckReport {
    /// Whether memtrace can run here: every required feature, every program loads.
    pub fn passed(&self) -> bool {
        self.features.iter().all(|f| f.available || !f.required)
            && !self.programs.is_empty()
            && self.programs.iter().all(|p| p.loaded)
    }
}

pub fn run(args: CheckArgs) -> Result<ExitCode> {
    let features = features::detect(std::path::Path::new("/sys"));
    let programs = match Tracer::load(&TracerOptions::default()) {
        Ok(mut tracer) => tracer
            .load_programs()
            .into_iter()
            .map(|(name, result)| ProgramCheck {
                name,
                loaded: result.is_ok(),
                error: result.err(),
            })
            .collect(),
        Err(e) => vec![ProgramCheck {
            name: "(object)".into(),
            loaded: false,
            error: Some(format!("{e:#}")),
        }],
    };
    let libc = match args.libc {
        Some(libc) => libc,
        None => crate::process::own_libc().context("finding memtrace's own libc")?,
    };
    let report = CheckReport {
        kernel: kernel_release(),
        features,
        programs,
        probes: tracer::probe_plan(&libc)?,
        libc,
    };
    match args.format {
        Format::Json => println!("{}", serde_json::to_string(&report)?),
        Format::Table => print_table(&report),
    }
    Ok(if report.passed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn print_table(report: &CheckReport) {
    println!("kernel {}", report.kernel);
    for f in &report.features {
        let state = match (f.available, f.required) {
            (true, _) => "yes",
            (false, true) => "MISSING (required)",
            (false, false) => "no",
        };
        println!("feature {:<32} {state:<20} {}", f.name, f.detail);
    }
    for p in &report.programs {
        let state = if p.loaded { "loaded" } else { "FAILED" };
        println!(
            "program {:<32} {state:<20} {}",
            p.name,
            p.error.as_deref().unwrap_or("")
        );
    }
    for p in &report.probes {
        println!(
            "probe   {:<32} +{:<19} {}",
            p.symbol,
            p.probe_offset,
            if p.emulated {
                "emulated"
            } else {
                "single-stepped"
            }
        );
    }
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into())
}
