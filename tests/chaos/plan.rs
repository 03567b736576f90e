//! Everything a seed decides, before anything runs: the instances' settings, the schedule of
//! faults (when, which kind, which target, for how long) and the receiver's answer to each
//! request (from the message id and how many requests for it came before, so it does not
//! depend on thread timing). Same seed, same plan.

use std::time::Duration;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Instances in every campaign.
pub const INSTANCES: usize = 3;
pub const TTL: Duration = Duration::from_secs(3);
pub const WEBHOOK_TIMEOUT: Duration = Duration::from_secs(1);
pub const MAX_PROCESSING_TIME: Duration = Duration::from_secs(1);

/// The settings a seed picks for its instances.
#[derive(Clone, Debug)]
pub struct Settings {
    /// PROCESSING_INTERVAL per instance (zero = continuous mode).
    pub intervals: [Duration; INSTANCES],
    pub batch_size: u32,
    pub max_attempts: u32,
    /// Share of requests the receiver answers badly while faults run.
    pub misbehaviour: f64,
}

/// Who a fault hits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    Slot(usize),
    /// Whichever instance holds the lease when the fault starts (slot 0 when nobody does).
    Holder,
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        match self {
            Target::Slot(n) => write!(f, "instance-{n}"),
            Target::Holder => f.write_str("holder"),
        }
    }
}

/// One kind of fault. `hold` in [`Fault`] is how long it lasts: the down time of a killed or
/// stopped process before its restart, how long a process or server stays paused, how long a
/// proxy drops traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// SIGKILL an instance, restart it after `hold`.
    Kill(Target),
    /// SIGSTOP an instance, SIGCONT after `hold`.
    Pause(Target),
    /// SIGTERM an instance, restart it `hold` after it exited.
    Term(Target),
    /// Kill redis-server and start it again, empty, after `hold`.
    RedisRestart,
    /// SIGSTOP redis-server for `hold`.
    RedisPause,
    /// `pg_ctl stop -m fast`, start again after `hold` (shorter than the TTL).
    PgRestart,
    /// The same with `hold` longer than the TTL.
    PgStop,
    /// pg_terminate_backend of every daemon connection.
    PgTerminate,
    /// The instance's PostgreSQL proxy refuses (resets) everything for `hold`.
    PgRefuse(Target),
    /// The instance's PostgreSQL proxy accepts and holds, forwarding nothing, for `hold`.
    PgBlackhole(Target),
    RedisRefuse(Target),
    RedisBlackhole(Target),
}

/// Every fault kind's name, as printed, counted and given to `--exclude`.
pub const FAULT_NAMES: &[&str] = &[
    "sigkill",
    "sigstop",
    "sigterm",
    "redis-restart",
    "redis-pause",
    "pg-restart",
    "pg-stop",
    "pg-terminate",
    "pg-refuse",
    "pg-blackhole",
    "redis-refuse",
    "redis-blackhole",
];

impl Kind {
    pub fn name(&self) -> &'static str {
        match self {
            Kind::Kill(_) => "sigkill",
            Kind::Pause(_) => "sigstop",
            Kind::Term(_) => "sigterm",
            Kind::RedisRestart => "redis-restart",
            Kind::RedisPause => "redis-pause",
            Kind::PgRestart => "pg-restart",
            Kind::PgStop => "pg-stop",
            Kind::PgTerminate => "pg-terminate",
            Kind::PgRefuse(_) => "pg-refuse",
            Kind::PgBlackhole(_) => "pg-blackhole",
            Kind::RedisRefuse(_) => "redis-refuse",
            Kind::RedisBlackhole(_) => "redis-blackhole",
        }
    }

    pub fn target(&self) -> Option<Target> {
        match *self {
            Kind::Kill(t)
            | Kind::Pause(t)
            | Kind::Term(t)
            | Kind::PgRefuse(t)
            | Kind::PgBlackhole(t)
            | Kind::RedisRefuse(t)
            | Kind::RedisBlackhole(t) => Some(t),
            _ => None,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Fault {
    /// Since the start of the campaign.
    pub at: Duration,
    pub kind: Kind,
    pub hold: Duration,
}

#[derive(Clone, Debug)]
pub struct Plan {
    pub seed: u64,
    pub duration: Duration,
    pub settings: Settings,
    pub faults: Vec<Fault>,
}

fn ms(rng: &mut ChaCha8Rng, lo: u64, hi: u64) -> Duration {
    Duration::from_millis(rng.random_range(lo..=hi))
}

impl Plan {
    /// The plan of `seed` for a campaign of `duration`, without the fault kinds in `exclude`.
    pub fn new(seed: u64, duration: Duration, exclude: &[String]) -> Plan {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let settings = Settings {
            intervals: std::array::from_fn(|_| {
                if rng.random_bool(0.5) {
                    Duration::ZERO
                } else {
                    Duration::from_millis(100)
                }
            }),
            batch_size: rng.random_range(5..=20),
            max_attempts: if rng.random_bool(0.25) { 5 } else { 50 },
            misbehaviour: rng.random_range(0.3..0.6),
        };
        // Weights per kind, in FAULT_NAMES order.
        const WEIGHTS: [u32; 12] = [3, 2, 2, 1, 1, 1, 1, 2, 1, 1, 1, 1];
        let total: u32 = WEIGHTS.iter().sum();
        let mut faults = Vec::new();
        // A few quiet seconds first, so that a leader is established and delivering.
        let mut at = Duration::from_secs(3);
        loop {
            at += ms(&mut rng, 300, 3500);
            if at >= duration {
                break;
            }
            let mut pick = rng.random_range(0..total);
            let index = WEIGHTS
                .iter()
                .position(|w| {
                    if pick < *w {
                        true
                    } else {
                        pick -= w;
                        false
                    }
                })
                .unwrap();
            let target = if rng.random_bool(0.5) {
                Target::Holder
            } else {
                Target::Slot(rng.random_range(0..INSTANCES))
            };
            let (kind, hold) = match index {
                0 => (Kind::Kill(target), ms(&mut rng, 0, 2000)),
                1 => (Kind::Pause(target), ms(&mut rng, 300, 6000)),
                2 => (Kind::Term(target), ms(&mut rng, 0, 1000)),
                3 => (Kind::RedisRestart, ms(&mut rng, 0, 1500)),
                4 => (Kind::RedisPause, ms(&mut rng, 300, 5000)),
                5 => (Kind::PgRestart, ms(&mut rng, 0, 1000)),
                6 => (Kind::PgStop, ms(&mut rng, 3500, 9000)),
                7 => (Kind::PgTerminate, Duration::ZERO),
                8 => (Kind::PgRefuse(target), ms(&mut rng, 500, 8000)),
                9 => (Kind::PgBlackhole(target), ms(&mut rng, 500, 8000)),
                10 => (Kind::RedisRefuse(target), ms(&mut rng, 500, 8000)),
                _ => (Kind::RedisBlackhole(target), ms(&mut rng, 500, 8000)),
            };
            // Excluded kinds still consume their random numbers: the rest of the plan stays
            // the same with or without them.
            if !exclude.iter().any(|e| e == kind.name()) {
                faults.push(Fault { at, kind, hold });
            }
        }
        Plan {
            seed,
            duration,
            settings,
            faults,
        }
    }
}

/// What the receiver does with one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Behaviour {
    /// 202 `{"message":"Accepted","messageId":"r<id>.<n>"}` after a delay (ms).
    Accept(u32),
    /// The same, with a NUL (`\u0000`) inside messageId.
    AcceptNul,
    /// 200 with a body that is not JSON (nor UTF-8).
    AcceptGarbage,
    /// 500 or 503 after a delay (ms), optionally with Retry-After.
    ServerError(u16, u32, Option<u32>),
    /// 500 whose body holds a 0x00 byte.
    ServerErrorNul,
    /// 429 with Retry-After (seconds).
    TooMany(u32),
    /// Reads the request, then resets the connection (SO_LINGER 0).
    Reset,
    /// Reads the request, then closes the connection without a word.
    Close,
    /// A status line that is not HTTP, then close.
    GarbageStatus,
    /// Never answers: holds the connection until the client gives up.
    Hang,
    /// 422: a permanent refusal (the message ends `failed`).
    Reject,
}

/// Behaviour names, for `--exclude` and the summary.
pub const BEHAVIOUR_NAMES: &[&str] = &[
    "accept",
    "slow",
    "too-slow",
    "nul-id",
    "garbage-2xx",
    "5xx",
    "nul-5xx",
    "429",
    "reset",
    "close",
    "garbage-status",
    "hang",
    "reject",
];

impl Behaviour {
    pub fn name(&self) -> &'static str {
        match self {
            Behaviour::Accept(0) => "accept",
            Behaviour::Accept(d) if (*d as u128) < WEBHOOK_TIMEOUT.as_millis() => "slow",
            Behaviour::Accept(_) => "too-slow",
            Behaviour::AcceptNul => "nul-id",
            Behaviour::AcceptGarbage => "garbage-2xx",
            Behaviour::ServerError(..) => "5xx",
            Behaviour::ServerErrorNul => "nul-5xx",
            Behaviour::TooMany(_) => "429",
            Behaviour::Reset => "reset",
            Behaviour::Close => "close",
            Behaviour::GarbageStatus => "garbage-status",
            Behaviour::Hang => "hang",
            Behaviour::Reject => "reject",
        }
    }
}

/// SplitMix64: a small, fixed hash for per-request decisions.
pub fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The receiver's answer to the `n`-th request (0 = first) for message `id`.
pub fn behaviour(seed: u64, misbehaviour: f64, exclude: &[String], id: i64, n: usize) -> Behaviour {
    let h = mix(seed ^ mix(id as u64 ^ mix(n as u64 + 1)));
    let unit = |h: u64| (h >> 11) as f64 / (1u64 << 53) as f64;
    if unit(h) >= misbehaviour {
        return Behaviour::Accept(0);
    }
    let h2 = mix(h);
    let r = (h2 >> 32) as u32;
    // (weight, behaviour)
    let choices: [(u32, Behaviour); 12] = [
        (14, Behaviour::Accept(100 + r % 800)),
        (4, Behaviour::Accept(1100 + r % 500)),
        (3, Behaviour::AcceptNul),
        (6, Behaviour::AcceptGarbage),
        (
            12,
            Behaviour::ServerError(
                if r % 2 == 0 { 500 } else { 503 },
                r % 300,
                (r % 3 == 0).then_some(r % 2),
            ),
        ),
        (3, Behaviour::ServerErrorNul),
        (10, Behaviour::TooMany(r % 3)),
        (8, Behaviour::Reset),
        (5, Behaviour::Close),
        (5, Behaviour::GarbageStatus),
        (6, Behaviour::Hang),
        (3, Behaviour::Reject),
    ];
    let allowed: Vec<&(u32, Behaviour)> = choices
        .iter()
        .filter(|(_, b)| !exclude.iter().any(|e| e == b.name()))
        .collect();
    let total: u32 = allowed.iter().map(|(w, _)| w).sum();
    if total == 0 {
        return Behaviour::Accept(0);
    }
    let mut pick = (h2 as u32) % total;
    for (w, b) in allowed {
        if pick < *w {
            return *b;
        }
        pick -= w;
    }
    unreachable!()
}
