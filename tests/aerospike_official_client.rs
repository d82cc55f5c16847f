//! Cross-checks against the official `aerospike` crate (a dev-dependency
//! only): our digest and partition id agree with its `Key` for the notes'
//! vectors and 10 000 random keys, and the official client can put, get,
//! create-only put, and delete against our protocol-level test server
//! (`tests/support/aerospike.rs`) — so that server speaks the protocol the
//! official client expects, tending included.

mod support;

use std::thread;
use std::time::{Duration, Instant};

use aerospike::{
    BasePolicy, Bin, Bins, Client, ClientPolicy, Key, ReadPolicy, RecordExistsAction, ResultCode,
    Value, WritePolicy,
};
use support::aerospike::{AeroServer, CLUSTER_NAME};
use txgate::cache::aerospike::codec::{
    self, DIGEST_LEN, PARTICLE_BLOB, PARTICLE_INTEGER, PARTICLE_STRING,
};

const NS: &str = "test";
/// Every client-side wait (connect, tend, command) is bounded by this.
const TIMEOUT_MS: u32 = 3_000;

fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// SplitMix64: a deterministic PRNG, so a failure names a reproducible key.
struct SplitMix(u64);

impl SplitMix {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// The official client's digest and partition id for `key` in `set`.
fn official(set: &str, key: Value) -> ([u8; DIGEST_LEN], u16) {
    let k = Key::new(NS, set, key).expect("official key");
    let pid = u16::try_from(k.partition_id()).expect("partition id fits u16");
    (k.digest(), pid)
}

/// Compares ours with the official client's for one key, with a readable
/// failure message.
fn check(set: &str, particle: u8, bytes: &[u8], value: Value) {
    let ours = codec::digest_typed(set.as_bytes(), particle, bytes);
    let (theirs, their_pid) = official(set, value);
    assert_eq!(
        hex(&ours),
        hex(&theirs),
        "digest of set {set:?}, particle {particle}, key {}",
        hex(bytes)
    );
    assert_eq!(
        codec::partition_id(&ours),
        their_pid,
        "partition id of set {set:?}, particle {particle}, key {}",
        hex(bytes)
    );
}

#[test]
fn digests_and_partition_ids_match_the_official_client() {
    // The notes' vectors (set "set"): ours, theirs and the written value.
    let vectors: [(u8, Vec<u8>, Value, &str, u16); 4] = [
        (
            PARTICLE_BLOB,
            vec![b'a'; 10],
            Value::Blob(vec![b'a'; 10]),
            "d10982327b2b04c7360579f252e164a75f83cd99",
            2513,
        ),
        (
            PARTICLE_BLOB,
            Vec::new(),
            Value::Blob(Vec::new()),
            "327e2877b8815c7aeede0d5a8620d4ef8df4a4b4",
            3634,
        ),
        (
            PARTICLE_STRING,
            b"haha".to_vec(),
            Value::String("haha".to_owned()),
            "36eb02a807dbade8cd784e7800d76308b4e89212",
            2870,
        ),
        (
            PARTICLE_INTEGER,
            0i64.to_be_bytes().to_vec(),
            Value::Int(0),
            "93d943aae37b017ad7e011b0c1d2e2143c2fb37d",
            2451,
        ),
    ];
    for (particle, bytes, value, want_hex, want_pid) in vectors {
        let (theirs, their_pid) = official("set", value.clone());
        assert_eq!(hex(&theirs), want_hex, "official digest of {value:?}");
        assert_eq!(their_pid, want_pid, "official partition id of {value:?}");
        let ours = codec::digest_typed(b"set", particle, &bytes);
        assert_eq!(hex(&ours), want_hex, "our digest of {value:?}");
        assert_eq!(codec::partition_id(&ours), want_pid);
        check("set", particle, &bytes, value);
    }
    // `digest` is the blob form every txgate key uses.
    assert_eq!(
        codec::digest(b"set", b"aaaaaaaaaa"),
        official("set", Value::Blob(vec![b'a'; 10])).0
    );

    // 10 000 random blob keys (lengths 0..64) over a few set names, plus
    // string and integer keys from the same stream.
    let sets = ["", "set", "txgate", "a-much-longer-set-name_63"];
    let mut rng = SplitMix(0x7867_6174_6521);
    let mut partitions_seen = std::collections::HashSet::new();
    for i in 0..10_000usize {
        let set = sets[i % sets.len()];
        let len = (rng.next_u64() % 64) as usize;
        let key: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
        let ours = codec::digest(set.as_bytes(), &key);
        let (theirs, their_pid) = official(set, Value::Blob(key.clone()));
        assert_eq!(
            ours,
            theirs,
            "digest of blob key {} in set {set:?}",
            hex(&key)
        );
        assert_eq!(
            codec::partition_id(&ours),
            their_pid,
            "pid of {}",
            hex(&key)
        );
        partitions_seen.insert(their_pid);

        if i % 10 == 0 {
            let s: String = key.iter().map(|b| char::from(b'a' + b % 26)).collect();
            check(set, PARTICLE_STRING, s.as_bytes(), Value::String(s.clone()));
            let n = rng.next_u64() as i64;
            check(set, PARTICLE_INTEGER, &n.to_be_bytes(), Value::Int(n));
        }
    }
    // Sanity: the keys really spread over the partition space.
    assert!(partitions_seen.len() > 3_000, "{}", partitions_seen.len());
}

fn client_policy() -> ClientPolicy {
    ClientPolicy {
        timeout: TIMEOUT_MS,
        connect_timeout: TIMEOUT_MS,
        login_timeout: TIMEOUT_MS,
        tend_interval: 250,
        cluster_name: Some(CLUSTER_NAME.to_owned()),
        ..ClientPolicy::default()
    }
}

/// Bounded command timeouts; no retries, so a failure shows at once.
fn base_policy() -> BasePolicy {
    BasePolicy {
        total_timeout: TIMEOUT_MS,
        socket_timeout: TIMEOUT_MS,
        max_retries: 0,
        ..BasePolicy::default()
    }
}

fn write_policy(action: RecordExistsAction) -> WritePolicy {
    WritePolicy {
        record_exists_action: action,
        base_policy: base_policy(),
        ..WritePolicy::default()
    }
}

fn read_policy() -> ReadPolicy {
    ReadPolicy {
        base_policy: base_policy(),
    }
}

fn connect(server: &AeroServer) -> Client {
    let hosts = server.seeds().join(",");
    Client::new(&client_policy(), &hosts).expect("official client connects to our test server")
}

/// Waits (bounded) until the client has discovered `n` nodes.
fn wait_for_nodes(client: &Client, n: usize) {
    let deadline = Instant::now() + Duration::from_millis(u64::from(TIMEOUT_MS) * 2);
    while client.node_names().len() < n {
        assert!(
            Instant::now() < deadline,
            "the official client found {:?}, wanted {n} nodes",
            client.node_names()
        );
        thread::sleep(Duration::from_millis(25));
    }
}

/// The put / get / create-only / delete round, through the official client.
fn crud_round(client: &Client, set: &str) {
    let key = Key::new(NS, set, Value::Blob(b"official-key".to_vec())).unwrap();
    let bin = Bin::new("v", Value::Blob(b"hello \x00\xff".to_vec()));

    // Put, then get it back.
    client
        .put(&write_policy(RecordExistsAction::Update), &key, &[bin])
        .expect("put");
    let record = client.get(&read_policy(), &key, ["v"]).expect("get");
    assert_eq!(
        record.bins.get("v"),
        Some(&Value::Blob(b"hello \x00\xff".to_vec()))
    );
    assert_eq!(record.generation, 1);
    let record = client
        .get(&read_policy(), &key, Bins::All)
        .expect("get all");
    assert_eq!(record.bins.len(), 1);

    // Create-only: the first succeeds, the second fails with key-exists.
    let fresh = Key::new(NS, set, Value::Blob(b"create-only".to_vec())).unwrap();
    let create = write_policy(RecordExistsAction::CreateOnly);
    let first = Bin::new("v", Value::Blob(b"first".to_vec()));
    client
        .put(&create, &fresh, &[first])
        .expect("first create-only put");
    let second = Bin::new("v", Value::Blob(b"second".to_vec()));
    let err = client
        .put(&create, &fresh, &[second])
        .expect_err("second create-only put must fail");
    assert_eq!(
        err.server_result_code(),
        Some(ResultCode::KeyExistsError),
        "{err:?}"
    );
    let record = client.get(&read_policy(), &fresh, ["v"]).expect("get");
    assert_eq!(record.bins.get("v"), Some(&Value::Blob(b"first".to_vec())));

    // Delete: true, then false; a get of the deleted key is not-found.
    let delete = write_policy(RecordExistsAction::Update);
    assert!(client.delete(&delete, &fresh).expect("delete"));
    assert!(!client.delete(&delete, &fresh).expect("second delete"));
    let err = client
        .get(&read_policy(), &fresh, Bins::All)
        .expect_err("get of a deleted key");
    assert_eq!(
        err.server_result_code(),
        Some(ResultCode::KeyNotFoundError),
        "{err:?}"
    );
    assert!(!client.exists(&read_policy(), &fresh).expect("exists"));
    assert!(client.exists(&read_policy(), &key).expect("exists"));

    // Our digest addresses the same record the official client wrote.
    assert_eq!(key.digest(), codec::digest(set.as_bytes(), b"official-key"));
}

#[test]
fn official_client_put_get_create_only_delete_against_our_test_server() {
    let server = AeroServer::start(1, NS);
    let client = connect(&server);
    wait_for_nodes(&client, 1);
    assert_eq!(client.node_names(), vec![server.node_id(0)]);
    crud_round(&client, "set");
    assert_eq!(server.live_records(), 1);
    client.close().expect("close");
}

#[test]
fn official_client_against_a_three_node_test_server_routes_to_masters() {
    let server = AeroServer::start(3, NS);
    let client = connect(&server);
    wait_for_nodes(&client, 3);
    let mut names = client.node_names();
    names.sort();
    let mut want: Vec<String> = (0..3).map(|i| server.node_id(i)).collect();
    want.sort();
    assert_eq!(names, want);
    // Give the tender a few rounds to load every node's `replicas`.
    thread::sleep(Duration::from_millis(1_000));

    crud_round(&client, "set");

    // With the partition map loaded, every request goes straight to the
    // partition's master: the official client computes the same partition
    // ids from the same digests as our server's map.
    let before = server.proxied();
    let policy = write_policy(RecordExistsAction::Update);
    for i in 0..300u32 {
        let key = Key::new(NS, "spread", Value::Blob(i.to_be_bytes().to_vec())).unwrap();
        client
            .put(&policy, &key, &[Bin::new("v", Value::Int(i64::from(i)))])
            .expect("put");
    }
    assert_eq!(server.proxied() - before, 0, "requests proxied");
    client.close().expect("close");
}
