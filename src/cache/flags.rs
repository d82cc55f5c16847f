//! A store's flags, registered on any clap command under a flag prefix and an
//! env prefix, so one binary can carry several stores (`--ingress-dedup-…`,
//! `--frames-…`). Every flag has an UPPERCASE env twin:
//! `--ingress-dedup-redis-addr` ↔ `INGRESS_DEDUP_REDIS_ADDR`.

use std::time::Duration;

use clap::{Arg, ArgAction, ArgMatches, Command};

use super::{
    AERO_REPLY_GATHER_DEFAULT, BackendKind, Config, DIAL_TIMEOUT_DEFAULT, MEMORY_MAX_KEYS_DEFAULT,
    OP_TIMEOUT_DEFAULT, REDIS_INFLIGHT_MAX_DEFAULT,
};
use crate::units::parse_duration;

/// A configuration the flags parse but do not allow, naming the flag.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FlagError {
    #[error("{flag} (env {env}) is required when {backend_flag} is {backend}")]
    Missing {
        flag: String,
        env: String,
        backend_flag: String,
        backend: BackendKind,
    },
    #[error("{flag} (env {env}): {problem}")]
    Invalid {
        flag: String,
        env: String,
        problem: String,
    },
}

/// The names of one store's flags; made by [`register_flags`].
#[derive(Debug, Clone)]
pub struct CacheFlags {
    flag_prefix: String,
    env_prefix: String,
}

/// Adds a store's flags to `cmd` as `--{flag_prefix}backend` etc., each with
/// env twin `{env_prefix}BACKEND` etc. Returns the command and the handle that
/// builds the [`Config`] from the parsed matches.
pub fn register_flags(cmd: Command, flag_prefix: &str, env_prefix: &str) -> (Command, CacheFlags) {
    let f = CacheFlags {
        flag_prefix: flag_prefix.to_owned(),
        env_prefix: env_prefix.to_owned(),
    };
    let heading = if flag_prefix.is_empty() {
        "Store".to_owned()
    } else {
        format!("Store ({})", flag_prefix.trim_end_matches('-'))
    };
    let cmd = cmd
        .next_help_heading(heading)
        .arg(
            f.arg("backend")
                .value_name("KIND")
                .value_parser(BackendKind::NAMES)
                .default_value("memory")
                .help("Store backing the cache: memory (per process), redis, aerospike, none (tier-1 only)"),
        )
        .arg(
            f.arg("memory-max-keys")
                .value_name("N")
                .value_parser(clap::value_parser!(usize))
                .default_value(MEMORY_MAX_KEYS_DEFAULT.to_string())
                .help("Memory backend: most keys over all shards, 0 = unbounded; soonest-to-expire evicted first"),
        )
        .arg(
            f.arg("redis-addr")
                .value_name("HOST:PORT")
                .help(format!("Redis-protocol server or cluster seed; required for {} redis", f.flag("backend"))),
        )
        .arg(
            f.arg("redis-username")
                .value_name("USER")
                .help("Redis ACL user (AUTH user password)"),
        )
        .arg(
            f.arg("redis-password")
                .value_name("PASSWORD")
                .hide_env_values(true)
                .help("Redis password (AUTH); prefer the env twin over the command line"),
        )
        .arg(
            f.arg("redis-db")
                .value_name("N")
                .value_parser(clap::value_parser!(u32))
                .default_value("0")
                .help("Redis database to SELECT (standalone only)"),
        )
        .arg(
            f.arg("redis-client-name")
                .value_name("NAME")
                .help("CLIENT SETNAME prefix (default txgate-<instance id>); each shard's connection adds -s<shard>"),
        )
        .arg(
            f.arg("redis-inflight-max")
                .value_name("N")
                .value_parser(clap::value_parser!(u64).range(1..=1_000_000))
                .default_value(REDIS_INFLIGHT_MAX_DEFAULT.to_string())
                .help("Requests in flight per Redis connection; past it ops fail fast (and claims fail open)"),
        )
        .arg(
            f.arg("redis-tls")
                .num_args(0..=1)
                .require_equals(true)
                .default_missing_value("true")
                .value_parser(clap::builder::BoolishValueParser::new())
                .default_value("false")
                .help(format!("Speak TLS to Redis (implied by any other {}-* flag)", f.flag("redis-tls"))),
        )
        .arg(
            f.arg("redis-tls-ca-file")
                .value_name("PEM")
                .value_parser(clap::value_parser!(std::path::PathBuf))
                .help("CA certificates to verify Redis servers with (default: the system bundle)"),
        )
        .arg(
            f.arg("redis-tls-cert-file")
                .value_name("PEM")
                .value_parser(clap::value_parser!(std::path::PathBuf))
                .help(format!("Client certificate chain, for servers that require one (with {})", f.flag("redis-tls-key-file"))),
        )
        .arg(
            f.arg("redis-tls-key-file")
                .value_name("PEM")
                .value_parser(clap::value_parser!(std::path::PathBuf))
                .help(format!("Client private key (with {})", f.flag("redis-tls-cert-file"))),
        )
        .arg(
            f.arg("redis-tls-server-name")
                .value_name("NAME")
                .help("Name the server certificate must carry (default: the host dialed)"),
        )
        .arg(
            f.arg("aero-hosts")
                .value_name("HOST:PORT,...")
                .value_delimiter(',')
                .action(ArgAction::Append)
                .help(format!("Aerospike seed nodes; required for {} aerospike", f.flag("backend"))),
        )
        .arg(
            f.arg("aero-namespace")
                .value_name("NS")
                .help(format!("Aerospike namespace; required for {} aerospike", f.flag("backend"))),
        )
        .arg(
            f.arg("aero-set")
                .value_name("SET")
                .default_value("txgate")
                .help("Aerospike set within the namespace"),
        )
        .arg(
            f.arg("aero-bin")
                .value_name("BIN")
                .default_value("v")
                .help("Aerospike bin holding the value (at most 15 bytes)"),
        )
        .arg(
            f.arg("aero-conns-per-node")
                .value_name("N")
                .value_parser(clap::value_parser!(u64).range(1..=64))
                .default_value("1")
                .help("Aerospike connections per node per shard (the server serves one request per connection at a time)"),
        )
        .arg(
            f.arg("aero-reply-gather")
                .value_name("DURATION")
                .value_parser(parse_duration)
                .default_value(format!("{}us", AERO_REPLY_GATHER_DEFAULT.as_micros()))
                .help("Longest pause before reading more Aerospike replies while 4 or more requests are in flight, so one wake-up takes several; it adapts below this (0: read at once; below the op timeout)"),
        )
        .arg(
            f.arg("dial-timeout")
                .value_name("DURATION")
                .value_parser(parse_duration)
                .default_value(format!("{}ms", DIAL_TIMEOUT_DEFAULT.as_millis()))
                .help("Bound on connecting to the store (e.g. 200ms)"),
        )
        .arg(
            f.arg("op-timeout")
                .value_name("DURATION")
                .value_parser(parse_duration)
                .default_value(format!("{}ms", OP_TIMEOUT_DEFAULT.as_millis()))
                .help("Bound on each store op; past it, dedup fails open and forwards (e.g. 50ms)"),
        );
    (cmd, f)
}

impl CacheFlags {
    fn id(&self, name: &str) -> String {
        format!("{}{}", self.flag_prefix, name)
    }

    /// `--{prefix}{name}` as a user types it.
    pub fn flag(&self, name: &str) -> String {
        format!("--{}", self.id(name))
    }

    /// The env twin of `--{prefix}{name}`.
    pub fn env(&self, name: &str) -> String {
        format!(
            "{}{}",
            self.env_prefix,
            name.to_uppercase().replace('-', "_")
        )
    }

    fn arg(&self, name: &str) -> Arg {
        Arg::new(self.id(name))
            .long(self.id(name))
            .env(self.env(name))
    }

    fn missing(&self, name: &str, backend: BackendKind) -> FlagError {
        FlagError::Missing {
            flag: self.flag(name),
            env: self.env(name),
            backend_flag: self.flag("backend"),
            backend,
        }
    }

    fn needs(&self, missing: &str, given: &str) -> FlagError {
        FlagError::Invalid {
            flag: self.flag(missing),
            env: self.env(missing),
            problem: format!("required with {}", self.flag(given)),
        }
    }

    /// Builds the store's [`Config`] from parsed matches, refusing
    /// combinations that cannot work (redis without an address, …).
    pub fn config(&self, m: &ArgMatches) -> Result<Config, FlagError> {
        let s = |name: &str| m.get_one::<String>(&self.id(name)).cloned();
        let d = |name: &str| {
            m.get_one::<Duration>(&self.id(name))
                .copied()
                .expect("has a default")
        };
        let backend: BackendKind =
            s("backend")
                .expect("has a default")
                .parse()
                .map_err(|problem| FlagError::Invalid {
                    flag: self.flag("backend"),
                    env: self.env("backend"),
                    problem,
                })?;
        let aero_hosts: Vec<String> = m
            .get_many::<String>(&self.id("aero-hosts"))
            .map(|v| {
                v.map(|h| h.trim().to_owned())
                    .filter(|h| !h.is_empty())
                    .collect()
            })
            .unwrap_or_default();
        let non_empty = |v: Option<String>| v.filter(|x| !x.trim().is_empty());
        let path = |name: &str| m.get_one::<std::path::PathBuf>(&self.id(name)).cloned();
        let mut config = Config {
            backend,
            memory_max_keys: *m
                .get_one::<usize>(&self.id("memory-max-keys"))
                .expect("has a default"),
            redis_addr: non_empty(s("redis-addr")),
            redis_username: non_empty(s("redis-username")),
            // An empty variable (`…_REDIS_PASSWORD=`) is no password, not
            // `AUTH ""`, which a server without one refuses.
            redis_password: s("redis-password")
                .filter(|p| !p.is_empty())
                .map(super::Secret::from),
            redis_db: *m
                .get_one::<u32>(&self.id("redis-db"))
                .expect("has a default"),
            redis_client_name: non_empty(s("redis-client-name"))
                .unwrap_or_else(|| Config::default().redis_client_name),
            redis_inflight_max: *m
                .get_one::<u64>(&self.id("redis-inflight-max"))
                .expect("has a default") as usize,
            redis_tls: *m
                .get_one::<bool>(&self.id("redis-tls"))
                .expect("has a default"),
            redis_tls_ca_file: path("redis-tls-ca-file"),
            redis_tls_cert_file: path("redis-tls-cert-file"),
            redis_tls_key_file: path("redis-tls-key-file"),
            redis_tls_server_name: non_empty(s("redis-tls-server-name")),
            aero_hosts,
            aero_namespace: non_empty(s("aero-namespace")),
            aero_set: s("aero-set").expect("has a default"),
            aero_bin: s("aero-bin").expect("has a default"),
            aero_conns_per_node: *m
                .get_one::<u64>(&self.id("aero-conns-per-node"))
                .expect("has a default") as usize,
            aero_reply_gather: d("aero-reply-gather"),
            dial_timeout: d("dial-timeout"),
            op_timeout: d("op-timeout"),
        };
        for (name, value) in [
            ("dial-timeout", config.dial_timeout),
            ("op-timeout", config.op_timeout),
        ] {
            if value.is_zero() {
                return Err(FlagError::Invalid {
                    flag: self.flag(name),
                    env: self.env(name),
                    problem: "must be greater than zero".into(),
                });
            }
        }
        if backend == BackendKind::Aerospike && config.aero_reply_gather >= config.op_timeout {
            return Err(FlagError::Invalid {
                flag: self.flag("aero-reply-gather"),
                env: self.env("aero-reply-gather"),
                problem: format!(
                    "{:?} must be below the op timeout ({:?}): replies would wait past it",
                    config.aero_reply_gather, config.op_timeout
                ),
            });
        }
        if let Some(bad) = super::redis::client_name_problem(&config.redis_client_name) {
            return Err(FlagError::Invalid {
                flag: self.flag("redis-client-name"),
                env: self.env("redis-client-name"),
                problem: bad,
            });
        }
        // Any TLS file, or a certificate name to check, means TLS.
        config.redis_tls |= config.redis_tls_ca_file.is_some()
            || config.redis_tls_cert_file.is_some()
            || config.redis_tls_key_file.is_some()
            || config.redis_tls_server_name.is_some();
        match (&config.redis_tls_cert_file, &config.redis_tls_key_file) {
            (Some(_), None) => return Err(self.needs("redis-tls-key-file", "redis-tls-cert-file")),
            (None, Some(_)) => return Err(self.needs("redis-tls-cert-file", "redis-tls-key-file")),
            _ => {}
        }
        match backend {
            BackendKind::Redis if config.redis_addr.is_none() => {
                Err(self.missing("redis-addr", backend))
            }
            BackendKind::Redis
                if config.redis_username.is_some() && config.redis_password.is_none() =>
            {
                Err(self.missing("redis-password", backend))
            }
            BackendKind::Aerospike if config.aero_hosts.is_empty() => {
                Err(self.missing("aero-hosts", backend))
            }
            BackendKind::Aerospike if config.aero_namespace.is_none() => {
                Err(self.missing("aero-namespace", backend))
            }
            BackendKind::Aerospike if config.aero_bin.is_empty() || config.aero_bin.len() > 15 => {
                Err(FlagError::Invalid {
                    flag: self.flag("aero-bin"),
                    env: self.env("aero-bin"),
                    problem: format!("'{}' must be 1 to 15 bytes", config.aero_bin),
                })
            }
            _ => Ok(config),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, String> {
        let (cmd, f) = register_flags(
            Command::new("t"),
            "ingress-dedup-",
            "TXGATE_TEST_INGRESS_DEDUP_",
        );
        let m = cmd
            .try_get_matches_from(std::iter::once("t").chain(args.iter().copied()))
            .map_err(|e| e.to_string())?;
        f.config(&m).map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_match_the_reference_package() {
        let c = parse(&[]).unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(c.dial_timeout, Duration::from_millis(200));
        assert_eq!(c.op_timeout, Duration::from_millis(50));
    }

    #[test]
    fn flags_fill_every_field() {
        let c = parse(&[
            "--ingress-dedup-backend",
            "aerospike",
            "--ingress-dedup-aero-hosts",
            "a:3000,b:3000",
            "--ingress-dedup-aero-namespace",
            "ns",
            "--ingress-dedup-aero-set",
            "s",
            "--ingress-dedup-memory-max-keys",
            "7",
            "--ingress-dedup-dial-timeout",
            "1s",
            "--ingress-dedup-op-timeout",
            "20ms",
        ])
        .unwrap();
        assert_eq!(c.backend, BackendKind::Aerospike);
        assert_eq!(c.aero_hosts, vec!["a:3000", "b:3000"]);
        assert_eq!(c.aero_namespace.as_deref(), Some("ns"));
        assert_eq!(c.aero_set, "s");
        assert_eq!(c.memory_max_keys, 7);
        assert_eq!(c.dial_timeout, Duration::from_secs(1));
        assert_eq!(c.op_timeout, Duration::from_millis(20));
    }

    #[test]
    fn unknown_backend_names_the_flag_and_the_allowed_values() {
        let e = parse(&["--ingress-dedup-backend", "bogus"]).unwrap_err();
        assert!(e.contains("--ingress-dedup-backend"), "{e}");
        for name in BackendKind::NAMES {
            assert!(e.contains(name), "{e}");
        }
    }

    #[test]
    fn bad_duration_names_the_flag() {
        let e = parse(&["--ingress-dedup-op-timeout", "fast"]).unwrap_err();
        assert!(e.contains("--ingress-dedup-op-timeout"), "{e}");
        let e = parse(&["--ingress-dedup-op-timeout", "0"]).unwrap_err();
        assert!(e.contains("--ingress-dedup-op-timeout"), "{e}");
    }

    #[test]
    fn reply_gather_is_a_duration_below_the_op_timeout() {
        let aero = [
            "--ingress-dedup-backend",
            "aerospike",
            "--ingress-dedup-aero-hosts",
            "a:3000",
            "--ingress-dedup-aero-namespace",
            "ns",
        ];
        let with =
            |extra: &[&'static str]| parse(&aero.iter().chain(extra).copied().collect::<Vec<_>>());
        assert_eq!(
            with(&[]).unwrap().aero_reply_gather,
            Duration::from_micros(200)
        );
        let c = with(&["--ingress-dedup-aero-reply-gather", "0"]).unwrap();
        assert_eq!(c.aero_reply_gather, Duration::ZERO);
        let c = with(&["--ingress-dedup-aero-reply-gather", "100us"]).unwrap();
        assert_eq!(c.aero_reply_gather, Duration::from_micros(100));
        let e = with(&["--ingress-dedup-aero-reply-gather", "soon"]).unwrap_err();
        assert!(e.contains("--ingress-dedup-aero-reply-gather"), "{e}");
        let e = with(&[
            "--ingress-dedup-aero-reply-gather",
            "50ms",
            "--ingress-dedup-op-timeout",
            "50ms",
        ])
        .unwrap_err();
        assert!(e.contains("--ingress-dedup-aero-reply-gather"), "{e}");
        assert!(
            e.contains("TXGATE_TEST_INGRESS_DEDUP_AERO_REPLY_GATHER"),
            "{e}"
        );
        assert!(e.contains("below the op timeout"), "{e}");
        // Other backends never read it: no error for them.
        assert!(
            parse(&[
                "--ingress-dedup-aero-reply-gather",
                "50ms",
                "--ingress-dedup-op-timeout",
                "50ms"
            ])
            .is_ok()
        );
    }

    #[test]
    fn redis_without_address_is_refused() {
        let e = parse(&["--ingress-dedup-backend", "redis"]).unwrap_err();
        assert!(e.contains("--ingress-dedup-redis-addr"), "{e}");
        assert!(e.contains("TXGATE_TEST_INGRESS_DEDUP_REDIS_ADDR"), "{e}");
        assert!(
            parse(&[
                "--ingress-dedup-backend",
                "redis",
                "--ingress-dedup-redis-addr",
                "127.0.0.1:6379"
            ])
            .is_ok()
        );
    }

    #[test]
    fn aerospike_without_hosts_or_namespace_is_refused() {
        let e = parse(&[
            "--ingress-dedup-backend",
            "aerospike",
            "--ingress-dedup-aero-namespace",
            "ns",
        ])
        .unwrap_err();
        assert!(e.contains("--ingress-dedup-aero-hosts"), "{e}");
        let e = parse(&[
            "--ingress-dedup-backend",
            "aerospike",
            "--ingress-dedup-aero-hosts",
            "h:3000",
        ])
        .unwrap_err();
        assert!(e.contains("--ingress-dedup-aero-namespace"), "{e}");
    }

    #[test]
    fn tls_files_imply_tls_and_a_certificate_needs_its_key() {
        let base = [
            "--ingress-dedup-backend",
            "redis",
            "--ingress-dedup-redis-addr",
            "h:1",
        ];
        let c = parse(&[&base[..], &["--ingress-dedup-redis-tls-ca-file", "/ca.pem"]].concat())
            .unwrap();
        assert!(c.redis_tls);
        let c = parse(&[&base[..], &["--ingress-dedup-redis-tls"]].concat()).unwrap();
        assert!(c.redis_tls && c.redis_tls_ca_file.is_none());
        let c = parse(&base).unwrap();
        assert!(!c.redis_tls);
        // A name for the server's certificate asks for TLS too.
        let c = parse(
            &[
                &base[..],
                &["--ingress-dedup-redis-tls-server-name", "redis.internal"],
            ]
            .concat(),
        )
        .unwrap();
        assert!(c.redis_tls);
        let e = parse(
            &[
                &base[..],
                &["--ingress-dedup-redis-tls-cert-file", "/c.pem"],
            ]
            .concat(),
        )
        .unwrap_err();
        assert!(e.contains("--ingress-dedup-redis-tls-key-file"), "{e}");
    }

    #[test]
    fn env_twins_are_read() {
        // A prefix of its own so no other test sees these variables. Clap
        // reads env values when the flag is registered, so set them first.
        // SAFETY: this test's variables are unique to it; no other thread reads them.
        unsafe {
            std::env::set_var("TXGATE_ENVT_BACKEND", "redis");
            std::env::set_var("TXGATE_ENVT_REDIS_ADDR", "10.0.0.1:6380");
            std::env::set_var("TXGATE_ENVT_OP_TIMEOUT", "7ms");
            // Set but empty: no password (not `AUTH ""`).
            std::env::set_var("TXGATE_ENVT_REDIS_PASSWORD", "");
        }
        let (cmd, f) = register_flags(Command::new("t"), "envt-", "TXGATE_ENVT_");
        let c = f.config(&cmd.try_get_matches_from(["t"]).unwrap()).unwrap();
        assert_eq!(c.backend, BackendKind::Redis);
        assert_eq!(c.redis_addr.as_deref(), Some("10.0.0.1:6380"));
        assert_eq!(c.op_timeout, Duration::from_millis(7));
        assert_eq!(c.redis_password, None);
    }

    #[test]
    fn a_client_name_redis_would_refuse_names_the_flag() {
        let redis = [
            "--ingress-dedup-backend",
            "redis",
            "--ingress-dedup-redis-addr",
            "h:1",
        ];
        for bad in ["edge gw", "a\nb", "caf\u{e9}"] {
            let args: Vec<&str> = redis
                .iter()
                .copied()
                .chain(["--ingress-dedup-redis-client-name", bad])
                .collect();
            let err = parse(&args).unwrap_err();
            assert!(err.contains("--ingress-dedup-redis-client-name"), "{err}");
            assert!(err.contains("printable ASCII without spaces"), "{err}");
        }
        let args: Vec<&str> = redis
            .iter()
            .copied()
            .chain(["--ingress-dedup-redis-client-name", "edge-gw_1"])
            .collect();
        assert_eq!(parse(&args).unwrap().redis_client_name, "edge-gw_1");
        assert_eq!(
            crate::cache::redis::client_name_for("edge a:\u{e9}"),
            "txgate-edge_a:_"
        );
    }
}
