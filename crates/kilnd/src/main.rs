//! The `kilnd` binary: `kilnd serve` (the daemon, PID 1 of every sandbox) and
//! `kilnd host-reaper` (the host-side subreaper service). Arguments are parsed by hand to keep
//! the static binary small.

mod daemon;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use tracing::Level;

const USAGE: &str = "\
usage:
  kilnd serve --listen SOCKET [--log-level LEVEL]
      Serve the kilnd protocol on a Unix socket (as PID 1 of a sandbox, or as a plain process).
  kilnd host-reaper --listen SOCKET [--daemonize] [--idle-exit-secs N] [--log-level LEVEL]
      Run commands for Kiln as a child subreaper; exits after N seconds (default 3; 0 = never)
      without clients and children, unless orphaned (then nobody would reap it). --daemonize
      double-forks into the background (and so never exits by itself).
  kilnd credential get|store|erase
      git credential helper inside a sandbox: relays `get` to the host through kilnd
      (set up by kilnd for execs with credentials; store and erase do nothing).
  kilnd version
LEVEL: error, warn, info (default), debug, trace";

#[derive(Debug, PartialEq)]
enum Cmd {
    Serve {
        listen: PathBuf,
        level: Level,
    },
    HostReaper {
        listen: PathBuf,
        level: Level,
        daemonize: bool,
        idle: Option<Duration>,
    },
    Credential {
        action: String,
    },
    Version,
    Help,
}

fn parse(args: &[String]) -> Result<Cmd, String> {
    let Some(sub) = args.first() else {
        return Err("missing command".into());
    };
    if sub == "credential" {
        // git appends the action (get, store, erase) to the helper command.
        return match args.get(1) {
            Some(a) if args.len() == 2 => Ok(Cmd::Credential { action: a.clone() }),
            _ => Err("usage: kilnd credential get|store|erase".into()),
        };
    }
    let mut listen = None;
    let mut level = Level::INFO;
    let mut daemonize = false;
    let mut idle = Some(Duration::from_secs(3));
    let mut it = args[1..].iter();
    while let Some(a) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{name} needs a value"))
        };
        match a.as_str() {
            "--listen" => listen = Some(PathBuf::from(value("--listen")?)),
            "--log-level" => {
                let v = value("--log-level")?;
                level = daemon::log::parse_level(&v)
                    .ok_or_else(|| format!("unknown log level: {v}"))?;
            }
            "--daemonize" if sub == "host-reaper" => daemonize = true,
            "--idle-exit-secs" if sub == "host-reaper" => {
                let v = value("--idle-exit-secs")?;
                let secs: f64 = v
                    .parse()
                    .map_err(|_| format!("bad --idle-exit-secs: {v}"))?;
                idle = if secs <= 0.0 {
                    None
                } else {
                    Some(
                        Duration::try_from_secs_f64(secs)
                            .map_err(|_| format!("bad --idle-exit-secs: {v}"))?,
                    )
                };
            }
            "-h" | "--help" => return Ok(Cmd::Help),
            other => return Err(format!("unexpected argument: {other}")),
        }
    }
    let need_listen = || {
        listen
            .clone()
            .ok_or_else(|| "--listen is required".to_string())
    };
    match sub.as_str() {
        "serve" => Ok(Cmd::Serve {
            listen: need_listen()?,
            level,
        }),
        "host-reaper" => Ok(Cmd::HostReaper {
            listen: need_listen()?,
            level,
            daemonize,
            idle,
        }),
        "version" | "--version" | "-V" => Ok(Cmd::Version),
        "help" | "--help" | "-h" => Ok(Cmd::Help),
        other => Err(format!("unknown command: {other}")),
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let cmd = match parse(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("kilnd: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let result = match cmd {
        Cmd::Credential { action } => daemon::creds::helper_main(&action),
        Cmd::Version => {
            println!("kilnd {}", kilnd::VERSION);
            Ok(())
        }
        Cmd::Help => {
            println!("{USAGE}");
            Ok(())
        }
        Cmd::Serve { listen, level } => {
            daemon::log::init(level);
            daemon::serve::run(&listen)
        }
        Cmd::HostReaper {
            listen,
            level,
            daemonize,
            idle,
        } => {
            if daemonize {
                if let Err(e) = daemon::host_reaper::daemonize() {
                    eprintln!("kilnd: daemonize: {e}");
                    return ExitCode::FAILURE;
                }
            }
            daemon::log::init(level);
            daemon::host_reaper::run(&listen, idle)
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("kilnd: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn parses_commands() {
        let cases = [
            "serve --listen /s",
            "serve --listen /s --log-level debug",
            "host-reaper --listen /r --daemonize --idle-exit-secs 0",
            "serve",
            "serve --daemonize --listen /s",
            "serve --listen",
            "bogus",
            "version",
        ];
        let out: Vec<String> = cases
            .iter()
            .map(|c| format!("{c} => {:?}", parse(&args(c))))
            .collect();
        expect_test::expect![[r#"
            [
                "serve --listen /s => Ok(Serve { listen: \"/s\", level: Level(Info) })",
                "serve --listen /s --log-level debug => Ok(Serve { listen: \"/s\", level: Level(Debug) })",
                "host-reaper --listen /r --daemonize --idle-exit-secs 0 => Ok(HostReaper { listen: \"/r\", level: Level(Info), daemonize: true, idle: None })",
                "serve => Err(\"--listen is required\")",
                "serve --daemonize --listen /s => Err(\"unexpected argument: --daemonize\")",
                "serve --listen => Err(\"--listen needs a value\")",
                "bogus => Err(\"unknown command: bogus\")",
                "version => Ok(Version)",
            ]
        "#]]
        .assert_debug_eq(&out);
    }
}
