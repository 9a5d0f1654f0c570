//! `warm-start`: a service with an expensive cold start, started warm from a checkpoint of
//! itself by `crac run`.
//!
//! # What it does
//!
//! On a cold start it does real warm-up work before it answers: it generates `--docs`
//! documents from a seeded pseudo-random generator (deterministic: the same documents every
//! time) and builds an inverted index over them, word -> ids of the documents that contain it.
//! That takes a few seconds of CPU at the default size in a release build. Then it answers a
//! one-line protocol on `127.0.0.1:PORT`, one request per connection:
//!
//! ```text
//! SEARCH word\n  ->  OK COUNT ID ID ...\n   how many documents contain the word, and the first
//!                                          (lowest) ids, at most 10
//! STATS\n        ->  {"pid":..,"docs":..,"terms":..,"postings":..,"postings_bytes":..,
//!                     "rss_kib":..,"started":"cold"|"restored","generation":..,
//!                     "last_restore":..,"warmup_ms":..,"instance":..,
//!                     "instance_renewals":..,"image":..}\n
//! ```
//!
//! `postings_bytes` is the size of the posting lists and their table, `rss_kib` the process's
//! resident memory (`VmRSS`) at the time of the request.
//!
//! The vocabulary is made of syllables (`ka`, `lo`, `mi`, ... then `kaka`, `kalo`, ...) and
//! drawn with a Zipf distribution, so `ka` is in most documents and long words in few.
//!
//! # What it shows
//!
//! The warm state (the index) is plain memory, which CRIU saves as it is, and restores at a
//! cost that grows with the memory the process has touched, while the warm-up's value is the
//! CPU time it took. So the index is kept compact (see `Index`): the posting lists are
//! delta-encoded varints in one byte array, built in two passes over the (regenerated)
//! documents so that no bigger temporary is ever allocated, and nothing else of the warm-up
//! stays resident. The warm-up log line gives `VmRSS` before and after. After warming up,
//! the service checkpoints *itself* once, with [`crac_agent::SelfCheckpoint`] and
//! `leave_running(true)`, and keeps serving. The next `crac run` of the same command restores
//! that image instead of starting cold, and the restored process answers at once with the index
//! already built:
//!
//! ```text
//! crac run --image warm -- target/release/warm-start --port 7080   # cold: warm-up, then image
//! crac run --image warm -- target/release/warm-start --port 7080   # warm: restored
//! ```
//!
//! `crac run` sets what the self-checkpoint needs: `CRAC_CHECKPOINT_TO` (the image name; without
//! it the service runs without checkpointing), `CRAC_STORE`, `CRAC_BIN`, a session of its own,
//! and stdio to a log file instead of a terminal. `scripts/warm-start-demo.sh` measures the time
//! to the first answer both ways.
//!
//! One resource is registered in the global context:
//!
//! | resource | before_checkpoint | after_restore |
//! |---|---|---|
//! | `seed` | nothing (logs the instance id) | `restored`: reseeds the random generator from the OS and takes a new instance id |
//!
//! `seed` follows the uniqueness advice for snapshot-restored services (AWS Lambda SnapStart's
//! "handling uniqueness"): every process restored from one image starts with the same memory,
//! random generator state and ids included, so whatever must be unique or unpredictable is
//! renewed after a restore. STATS shows the instance id; each restored process has its own.
//! The original process keeps its id when it is told `resumed`: its copies are the ones that
//! renew theirs.
//!
//! The listening socket is kept: it goes into the image, so a restored process answers on its
//! port at once, with no hook. The accept loop ([`GatedListener`], shared with the
//! `cache-server` example) serves one connection at a time, each in a
//! [critical section](crac_core::critical_section) taken before the accept: a checkpoint waits
//! for the request in progress, clients that connect while it is taken wait in the listener's
//! queue, and after a restore nothing is served until every after_restore hook has run (the
//! new instance id included). The process answers only once the listener exists: it is bound
//! after the warm-up, and the self-checkpoint runs after that.
//!
//! Options: `--port PORT` (default `$WARM_START_PORT`, then 7080), `--docs N` (default
//! `$WARM_START_DOCS`, then 100000: about 3 s in a release build, 25 s in a debug build),
//! `--no-checkpoint` (do not checkpoint even under `crac run`).

use std::collections::HashMap;
use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crac_agent::{SelfCheckpoint, CHECKPOINT_TO_ENV};
use crac_core::{
    global_context, CheckpointInfo, Coordinator, HookError, Resource, RestoreInfo, RestoreReason,
};
use crac_examples::listener::GatedListener;
use crac_examples::{lock, Log};

const DEFAULT_PORT: u16 = 7080;
/// About 2.5-3 s of warm-up in a release build on a small machine (two passes over the
/// documents, ~14 million words each).
const DEFAULT_DOCS: u32 = 100_000;
/// The seed of the documents: the same corpus on every cold start.
const CORPUS_SEED: u64 = 0x5eed_c0ff_ee00_0001;
/// Words in the vocabulary, and the shortest and longest document (in words).
const VOCABULARY: usize = 30_000;
const MIN_WORDS: u64 = 40;
const MAX_WORDS: u64 = 240;
/// How many ids a SEARCH reply lists.
const FIRST_IDS: usize = 10;
/// The syllables words are made of.
const SYLLABLES: [&str; 24] = [
    "ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "be", "da", "fu", "go", "hi", "ju", "ke", "la",
    "mo", "ni", "po", "qu", "re", "su", "te", "wa",
];

/// How long a client may take to send its request and read the reply (a request holds
/// checkpoints off).
const CLIENT_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest request line accepted.
const MAX_REQUEST: u64 = 1024;
/// Signs the log lines: one per hook, in the order they run:
/// `warm-start: after_restore seed: ...`.
const LOG: Log = Log::new("warm-start");

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("warm-start: error: {message}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), String> {
    let launched = Instant::now();
    let config = Config::from_args()?;
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, config.port));

    let state = Arc::new(State::new());
    let seed = Arc::new(Seed::new());
    global_context()
        .register(SeedResource {
            seed: Arc::clone(&seed),
            state: Arc::clone(&state),
        })
        .keep();
    let _agent =
        crac_agent::start().map_err(|err| format!("cannot start the CRaC agent: {err}"))?;
    let pid = std::process::id();
    eprintln!(
        "warm-start: pid {pid}, cold start: indexing {} documents (instance {})",
        config.docs,
        seed.instance()
    );

    // The warm-up: the work a restored process does not do again.
    let rss_before = rss_kib();
    let index = Index::build(config.docs);
    let warmup_ms = ms(launched.elapsed());
    state.warmup_ms.store(warmup_ms.to_bits(), Ordering::SeqCst);
    eprintln!(
        "warm-start: warm-up done in {warmup_ms:.0} ms: {} documents, {} words, {} terms, \
         {} postings in {:.1} MiB; VmRSS {} before, {} after",
        index.docs,
        index.words,
        index.terms(),
        index.postings,
        index.list_bytes() as f64 / MIB,
        show_kib(rss_before),
        show_kib(rss_kib()),
    );

    let listener = GatedListener::bind(addr, LOG)?;
    eprintln!(
        "warm-start: serving SEARCH/STATS on {}, {:.0} ms after launch",
        listener.local_addr(),
        ms(launched.elapsed())
    );
    let service = Arc::new(Service {
        index,
        seed,
        state: Arc::clone(&state),
        coordinator: Coordinator::global(),
    });
    let server = {
        let service = Arc::clone(&service);
        // Serves connections one at a time, for good.
        thread::Builder::new()
            .name("accept".into())
            .spawn(move || listener.serve(|stream| service.handle(stream)))
            .map_err(|err| format!("cannot start the accept thread: {err}"))?
    };

    match std::env::var(CHECKPOINT_TO_ENV)
        .ok()
        .filter(|v| !v.is_empty())
    {
        Some(_) if config.no_checkpoint => {
            eprintln!("warm-start: --no-checkpoint: not taking an image");
        }
        Some(to) => checkpoint_once(&to, &state, &service.seed),
        None => eprintln!(
            "warm-start: {CHECKPOINT_TO_ENV} is not set: not taking an image \
             (start me with `crac run --image NAME -- ...` to get warm starts)"
        ),
    }

    server
        .join()
        .map_err(|_| "the accept thread panicked".to_owned())?
}

/// Checkpoints this process into image `to` and keeps serving. Returns in the original process
/// (`resumed`) and, later, in every process restored from the image (`restored`).
fn checkpoint_once(to: &str, state: &State, seed: &Seed) {
    state.set_image("saving");
    eprintln!("warm-start: warm: checkpointing myself into image {to:?} (leave running)");
    let started = Instant::now();
    match SelfCheckpoint::new().to(to).leave_running(true).run() {
        Ok(RestoreReason::Resumed) => {
            state.set_image("saved");
            eprintln!(
                "warm-start: image {to:?} saved in {:.0} ms, still serving",
                ms(started.elapsed())
            );
        }
        Ok(RestoreReason::Restored) => {
            // This runs in a process restored from the image, not in the one that took it.
            state.set_image("started from it");
            eprintln!(
                "warm-start: pid {}: started warm from image {to:?} (instance {})",
                std::process::id(),
                seed.instance()
            );
        }
        Ok(other) => {
            state.set_image("aborted");
            eprintln!("warm-start: the checkpoint ended with {other}: no image, still serving");
        }
        Err(err) => {
            state.set_image("failed");
            eprintln!("warm-start: no image: {err}; still serving (cold starts only)");
        }
    }
}

// --- Configuration --------------------------------------------------------------------------

struct Config {
    port: u16,
    docs: u32,
    no_checkpoint: bool,
}

impl Config {
    fn from_args() -> Result<Config, String> {
        let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let mut port = env("WARM_START_PORT");
        let mut docs = env("WARM_START_DOCS");
        let mut no_checkpoint = false;
        let mut args = std::env::args().skip(1);
        while let Some(arg) = args.next() {
            let mut value = |flag: &str| {
                args.next()
                    .ok_or_else(|| format!("{flag} needs a value (try --help)"))
            };
            match arg.as_str() {
                "--port" => port = Some(value("--port")?),
                "--docs" => docs = Some(value("--docs")?),
                "--no-checkpoint" => no_checkpoint = true,
                "-h" | "--help" => {
                    println!(
                        "usage: warm-start [--port PORT] [--docs N] [--no-checkpoint]\n  \
                         --port           where to serve (default $WARM_START_PORT, then {DEFAULT_PORT})\n  \
                         --docs           documents to index at a cold start (default $WARM_START_DOCS, then {DEFAULT_DOCS})\n  \
                         --no-checkpoint  do not checkpoint after the warm-up, even if ${CHECKPOINT_TO_ENV} is set\n\
                         Run it under `crac run --image NAME -- warm-start ...` for warm starts."
                    );
                    std::process::exit(0);
                }
                other => return Err(format!("unknown argument {other:?} (try --help)")),
            }
        }
        let port = match port {
            None => DEFAULT_PORT,
            Some(raw) => raw
                .parse()
                .map_err(|_| format!("invalid port {raw:?}: expected a number from 0 to 65535"))?,
        };
        let docs = match docs {
            None => DEFAULT_DOCS,
            Some(raw) => raw
                .parse()
                .ok()
                .filter(|&n| n > 0)
                .ok_or_else(|| format!("invalid --docs {raw:?}: expected a number above 0"))?,
        };
        Ok(Config {
            port,
            docs,
            no_checkpoint,
        })
    }
}

// --- The warm state: an inverted index --------------------------------------------------------

/// SplitMix64 (Steele, Lea, Flood 2014): small, fast, and good enough for test data and ids.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n` > 0; the slight modulo bias does not matter here).
    fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// A float in `[0, 1)`.
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Word number `rank` of the vocabulary: `rank` written in bijective base 24 with a syllable
/// per digit (0 = `ka`, 23 = `wa`, 24 = `kaka`, 25 = `kalo`, ...).
fn word(mut rank: usize) -> String {
    let mut syllables = Vec::new();
    loop {
        syllables.push(SYLLABLES[rank % SYLLABLES.len()]);
        if rank < SYLLABLES.len() {
            break;
        }
        rank = rank / SYLLABLES.len() - 1;
    }
    syllables.reverse();
    syllables.concat()
}

/// The generated documents: the same ones, in the same order, every time they are generated.
struct Corpus {
    /// The words, by rank, one after another (two allocations rather than one per word, so
    /// that nothing of it stays behind in the heap once it is dropped).
    vocabulary: String,
    /// Rank -> where its word ends in `vocabulary` (it starts where the previous one ends).
    ends: Vec<u32>,
    /// Zipf's law: the word of rank r is drawn with weight 1 / (r + 1); the running sums.
    cumulative: Vec<f64>,
}

impl Corpus {
    fn new() -> Corpus {
        let mut total = 0.0;
        let cumulative = (0..VOCABULARY)
            .map(|rank| {
                total += 1.0 / (rank + 1) as f64;
                total
            })
            .collect();
        let mut vocabulary = String::new();
        let ends = (0..VOCABULARY)
            .map(|rank| {
                vocabulary.push_str(&word(rank));
                vocabulary.len() as u32
            })
            .collect();
        Corpus {
            vocabulary,
            ends,
            cumulative,
        }
    }

    /// The word of rank `rank`.
    fn word(&self, rank: usize) -> &str {
        let start = rank.checked_sub(1).map_or(0, |before| self.ends[before]);
        &self.vocabulary[start as usize..self.ends[rank] as usize]
    }

    /// Generates documents `0..docs` and calls `each(id, text)` with each one's text (words
    /// separated by spaces, as a real indexer would get it). The text is not kept: one buffer
    /// is reused.
    fn for_each_document(&self, docs: u32, mut each: impl FnMut(u32, &str)) {
        let total = self.cumulative[VOCABULARY - 1];
        let mut rng = Rng(CORPUS_SEED);
        let mut text = String::new();
        for id in 0..docs {
            text.clear();
            let length = MIN_WORDS + rng.below(MAX_WORDS - MIN_WORDS + 1);
            for _ in 0..length {
                let target = rng.unit() * total;
                let rank = self
                    .cumulative
                    .partition_point(|&c| c <= target)
                    .min(VOCABULARY - 1);
                text.push_str(self.word(rank));
                text.push(' ');
            }
            each(id, &text);
        }
    }
}

/// The warm state: an inverted index, word -> ids of the documents that contain it, kept
/// compact because its size is what a restore costs (CRIU restores every resident page).
///
/// All the posting lists are in one byte array, one list after another. A list holds its ids
/// ascending, each as the difference from the previous id + 1 (so the first one is the id + 1,
/// and the next ones are the gaps, 1 for consecutive documents), each difference a LEB128
/// varint: 7 bits per byte, low bits first, the high bit set on every byte but the last. The
/// common words, in most documents, take about a byte per document; the rare ones up to 3.
struct Index {
    /// Word -> its term number, the index into `counts` and `starts`.
    terms: HashMap<Box<str>, u32>,
    /// Term -> how many documents contain it (how many ids its list holds).
    counts: Vec<u32>,
    /// Term -> where its list starts in `lists`; one more entry at the end, so the list of
    /// term `t` is `lists[starts[t]..starts[t + 1]]`.
    starts: Vec<usize>,
    /// Every posting list, delta-encoded varints.
    lists: Vec<u8>,
    docs: u32,
    /// Words in all documents.
    words: u64,
    /// (word, document) pairs.
    postings: u64,
}

impl Index {
    /// Generates `docs` documents and indexes them, in two passes over the same (regenerated)
    /// documents, so that nothing bigger than the index itself is ever allocated: the first
    /// numbers the words, counts each one's documents and sums the size of its encoded list;
    /// the second encodes every list into its place in one array of exactly that size.
    fn build(docs: u32) -> Index {
        let corpus = Corpus::new();

        // Pass 1: terms, and per term its document count and encoded size.
        let mut terms: HashMap<Box<str>, u32> = HashMap::new();
        let mut counts: Vec<u32> = Vec::new();
        let mut sizes: Vec<usize> = Vec::new();
        // Term -> id + 1 of the last document seen with it, 0 before the first.
        let mut last: Vec<u32> = Vec::new();
        let (mut words, mut postings) = (0u64, 0u64);
        corpus.for_each_document(docs, |id, text| {
            let next = id + 1;
            for token in text.split_ascii_whitespace() {
                words += 1;
                let term = match terms.get(token) {
                    Some(&term) => term as usize,
                    None => {
                        let term = counts.len();
                        terms.insert(token.into(), term as u32);
                        counts.push(0);
                        sizes.push(0);
                        last.push(0);
                        term
                    }
                };
                if last[term] != next {
                    sizes[term] += varint_len(next - last[term]);
                    counts[term] += 1;
                    last[term] = next;
                    postings += 1;
                }
            }
        });

        // The lists' places, and each term's write position in pass 2.
        let mut starts = Vec::with_capacity(sizes.len() + 1);
        let mut end = 0;
        for size in sizes {
            starts.push(end);
            end += size;
        }
        starts.push(end);
        let mut at = starts[..starts.len() - 1].to_vec();
        let mut lists = vec![0u8; end];

        // Pass 2: the same documents again, each (term, document) encoded in its list.
        last.fill(0);
        corpus.for_each_document(docs, |id, text| {
            let next = id + 1;
            for token in text.split_ascii_whitespace() {
                let term = terms[token] as usize;
                if last[term] != next {
                    let pos = at[term];
                    at[term] = pos + put_varint(&mut lists[pos..], next - last[term]);
                    last[term] = next;
                }
            }
        });
        assert!(
            at.iter().eq(&starts[1..]),
            "the second pass did not fill the lists the first one measured"
        );

        terms.shrink_to_fit();
        counts.shrink_to_fit();
        Index {
            terms,
            counts,
            starts,
            lists,
            docs,
            words,
            postings,
        }
    }

    fn terms(&self) -> usize {
        self.terms.len()
    }

    /// Bytes of the posting lists and of their table (`counts` and `starts`).
    fn list_bytes(&self) -> usize {
        self.lists.len()
            + self.counts.len() * std::mem::size_of::<u32>()
            + self.starts.len() * std::mem::size_of::<usize>()
    }

    /// The ids of the documents that contain `word`, ascending, decoded as they are read.
    fn search(&self, word: &str) -> Postings<'_> {
        match self.terms.get(word) {
            Some(&term) => {
                let term = term as usize;
                Postings {
                    bytes: &self.lists[self.starts[term]..self.starts[term + 1]],
                    left: self.counts[term],
                    last: 0,
                }
            }
            None => Postings {
                bytes: &[],
                left: 0,
                last: 0,
            },
        }
    }
}

/// A posting list being decoded: see [`Index`].
struct Postings<'a> {
    /// The varints not read yet.
    bytes: &'a [u8],
    /// Ids not read yet.
    left: u32,
    /// The last id read + 1 (0 before the first).
    last: u32,
}

impl Iterator for Postings<'_> {
    type Item = u32;

    fn next(&mut self) -> Option<u32> {
        if self.left == 0 {
            return None;
        }
        let mut delta = 0u32;
        let mut shift = 0;
        loop {
            let (&byte, rest) = self.bytes.split_first()?;
            self.bytes = rest;
            delta |= u32::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                break;
            }
            shift += 7;
        }
        self.left -= 1;
        self.last += delta;
        Some(self.last - 1)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.left as usize, Some(self.left as usize))
    }
}

/// The count is stored: `len()` reads nothing.
impl ExactSizeIterator for Postings<'_> {}

/// Bytes of `value` as a LEB128 varint.
fn varint_len(value: u32) -> usize {
    let bits = u32::BITS - (value | 1).leading_zeros();
    bits.div_ceil(7) as usize
}

/// Writes `value` as a LEB128 varint at the start of `out`; returns the bytes written.
fn put_varint(out: &mut [u8], mut value: u32) -> usize {
    let mut written = 0;
    while value >= 0x80 {
        out[written] = (value & 0x7f) as u8 | 0x80;
        value >>= 7;
        written += 1;
    }
    out[written] = value as u8;
    written + 1
}

/// This process's resident memory (`VmRSS` in /proc/self/status), in KiB.
fn rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()
}

// --- Requests -------------------------------------------------------------------------------

/// What STATS reports besides the index.
struct State {
    /// "cold" or "restored".
    started: Mutex<&'static str>,
    /// The self-checkpoint's image: None (not taken), "saving", "saved", "started from it"
    /// (in a restored copy), "aborted", "failed".
    image: Mutex<Option<&'static str>>,
    /// The cold start's warm-up time, f64 bits (restored copies keep the original's).
    warmup_ms: AtomicU64,
}

impl State {
    fn new() -> State {
        State {
            started: Mutex::new("cold"),
            image: Mutex::new(None),
            warmup_ms: AtomicU64::new(0),
        }
    }

    fn set_image(&self, what: &'static str) {
        *lock(&self.image) = Some(what);
    }

    /// In a restored copy, from an after_restore hook (so before any request is served): it
    /// started from an image, and the self-checkpoint it was in the middle of is over.
    fn mark_restored(&self) {
        *lock(&self.started) = "restored";
        let mut image = lock(&self.image);
        if *image == Some("saving") {
            *image = Some("started from it");
        }
    }
}

struct Service {
    index: Index,
    seed: Arc<Seed>,
    state: Arc<State>,
    coordinator: &'static Coordinator,
}

impl Service {
    /// Reads one request line and answers it; the caller closes the connection.
    fn handle(&self, stream: &TcpStream) -> Result<(), String> {
        crac_examples::answer_one_line(stream, CLIENT_TIMEOUT, MAX_REQUEST, |request| {
            self.answer(request)
        })
    }

    fn answer(&self, request: &str) -> String {
        match request.split_once(' ') {
            Some(("SEARCH", word)) if !word.is_empty() && !word.contains(' ') => {
                self.search(&word.to_ascii_lowercase())
            }
            None if request == "STATS" => self.stats(),
            _ => "ERR expected: SEARCH word | STATS".to_owned(),
        }
    }

    fn search(&self, word: &str) -> String {
        let ids = self.index.search(word);
        let mut reply = format!("OK {}", ids.len());
        for id in ids.take(FIRST_IDS) {
            reply.push_str(&format!(" {id}"));
        }
        reply
    }

    fn stats(&self) -> String {
        let (instance, renewals) = self.seed.snapshot();
        serde_json::json!({
            "pid": std::process::id(),
            "docs": self.index.docs,
            "terms": self.index.terms(),
            "postings": self.index.postings,
            "postings_bytes": self.index.list_bytes(),
            "rss_kib": rss_kib(),
            "started": *lock(&self.state.started),
            "generation": self.coordinator.generation(),
            "last_restore": self.coordinator.last_restore().map(|info| info.reason.as_str()),
            "warmup_ms": (f64::from_bits(self.state.warmup_ms.load(Ordering::SeqCst)) * 10.0).round() / 10.0,
            "instance": format!("{instance:016x}"),
            "instance_renewals": renewals,
            "image": *lock(&self.state.image),
        })
        .to_string()
    }
}

// --- The seed resource ----------------------------------------------------------------------

/// A random generator and the instance id drawn from it: both must differ between processes
/// restored from one image.
struct Seed {
    inner: Mutex<SeedState>,
}

struct SeedState {
    rng: Rng,
    instance: u64,
    renewals: u64,
}

impl Seed {
    fn new() -> Seed {
        let mut rng = Rng(os_entropy());
        let instance = rng.next_u64();
        Seed {
            inner: Mutex::new(SeedState {
                rng,
                instance,
                renewals: 0,
            }),
        }
    }

    fn instance(&self) -> String {
        format!("{:016x}", lock(&self.inner).instance)
    }

    fn snapshot(&self) -> (u64, u64) {
        let inner = lock(&self.inner);
        (inner.instance, inner.renewals)
    }

    /// Reseeds from the OS and draws a new instance id; returns (old, new).
    fn renew(&self) -> (u64, u64) {
        let mut inner = lock(&self.inner);
        let old = inner.instance;
        inner.rng = Rng(os_entropy() ^ inner.rng.next_u64());
        inner.instance = inner.rng.next_u64();
        inner.renewals += 1;
        (old, inner.instance)
    }
}

/// 64 bits from the kernel's random pool (/dev/urandom), or, should that fail, from the clock
/// and pid (different in every restored process, which is what matters here).
fn os_entropy() -> u64 {
    let mut bytes = [0u8; 8];
    let read = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes));
    match read {
        Ok(()) => u64::from_ne_bytes(bytes),
        Err(_) => {
            let nanos = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            let mut mix = Rng(nanos ^ (u64::from(std::process::id()) << 32));
            mix.next_u64()
        }
    }
}

struct SeedResource {
    seed: Arc<Seed>,
    state: Arc<State>,
}

impl Resource for SeedResource {
    fn name(&self) -> std::borrow::Cow<'_, str> {
        "seed".into()
    }

    fn before_checkpoint(&self, _: &CheckpointInfo) -> Result<(), HookError> {
        LOG.hook(
            "before_checkpoint",
            "seed",
            format_args!(
                "instance {} goes into the image; restored copies will renew it",
                self.seed.instance()
            ),
        );
        Ok(())
    }

    /// A restored copy: new seed, new id, and it says it started from the image. The original
    /// (`resumed`) and an aborted checkpoint keep theirs.
    fn after_restore(&self, info: &RestoreInfo) -> Result<(), HookError> {
        if info.reason != RestoreReason::Restored {
            LOG.hook(
                "after_restore",
                "seed",
                format_args!(
                    "{}: keeping instance {} (generation {})",
                    info.reason,
                    self.seed.instance(),
                    info.generation
                ),
            );
            return Ok(());
        }
        let (old, new) = self.seed.renew();
        self.state.mark_restored();
        LOG.hook(
            "after_restore",
            "seed",
            format_args!(
                "restored: reseeded from the OS, instance {old:016x} -> {new:016x} (generation {})",
                info.generation
            ),
        );
        Ok(())
    }
}

// --- Helpers --------------------------------------------------------------------------------

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

const MIB: f64 = 1024.0 * 1024.0;

/// A size in KiB as MiB with one decimal, or `?` when it could not be read.
fn show_kib(kib: Option<u64>) -> String {
    kib.map_or_else(
        || "?".to_owned(),
        |kib| format!("{:.1} MiB", kib as f64 / 1024.0),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_are_bijective_base_24() {
        assert_eq!(word(0), "ka");
        assert_eq!(word(23), "wa");
        assert_eq!(word(24), "kaka");
        assert_eq!(word(25), "kalo");
        let all: std::collections::HashSet<String> = (0..VOCABULARY).map(word).collect();
        assert_eq!(all.len(), VOCABULARY);
    }

    #[test]
    fn the_index_is_deterministic_and_sorted() {
        let a = Index::build(300);
        let b = Index::build(300);
        assert_eq!(a.postings, b.postings);
        assert_eq!(a.lists, b.lists);
        let ka: Vec<u32> = a.search("ka").collect();
        assert_eq!(ka, b.search("ka").collect::<Vec<_>>());
        assert!(!ka.is_empty());
        assert!(ka.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(a.search("zz").len(), 0);
        assert_eq!(a.search("zz").next(), None);
    }

    #[test]
    fn varints_round_trip() {
        for value in [
            1,
            2,
            127,
            128,
            300,
            16_383,
            16_384,
            2_097_151,
            2_097_152,
            u32::MAX,
        ] {
            let mut out = [0u8; 5];
            let written = put_varint(&mut out, value);
            assert_eq!(written, varint_len(value), "{value}");
            let mut decoded = Postings {
                bytes: &out[..written],
                left: 1,
                last: 0,
            };
            assert_eq!(decoded.next(), Some(value - 1), "{value}");
            assert_eq!(decoded.next(), None);
        }
    }

    /// The compact index holds the same lists as a plain word -> `Vec<u32>` map.
    #[test]
    fn the_compact_index_matches_a_plain_one() {
        let docs = 2_000;
        let index = Index::build(docs);
        let mut plain: HashMap<String, Vec<u32>> = HashMap::new();
        Corpus::new().for_each_document(docs, |id, text| {
            for token in text.split_ascii_whitespace() {
                let ids = plain.entry(token.to_owned()).or_default();
                if ids.last() != Some(&id) {
                    ids.push(id);
                }
            }
        });
        assert_eq!(index.terms(), plain.len());
        assert_eq!(
            index.postings,
            plain.values().map(|ids| ids.len() as u64).sum::<u64>()
        );
        for (word, ids) in &plain {
            let postings = index.search(word);
            assert_eq!(postings.len(), ids.len(), "{word}");
            assert_eq!(&postings.collect::<Vec<_>>(), ids, "{word}");
        }
    }
}
