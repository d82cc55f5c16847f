//! The backend contract suite on the memory backend, over 4 shards.

mod support;

use txgate::cache::{self, BackendKind, Config};

fn memory_engine() -> ((), txgate::engine::Engine) {
    let backend = cache::open(&Config {
        backend: BackendKind::Memory,
        ..Config::default()
    })
    .expect("memory opens");
    ((), support::engine(4, backend))
}

contract_suite!(memory_engine);
