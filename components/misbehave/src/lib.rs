//! `misbehave`: a test-only preprocessor that does what its input says, so
//! the end-to-end tests can prove a bad guest cannot hurt the host.
//!
//! - `echo:TEXT`: answers a u8 tensor `echo` holding TEXT;
//! - `print:TEXT`: writes TEXT to stdout and stderr, then echoes it;
//! - `spam:N`: writes N numbered lines to stdout (a chatty guest);
//! - `sleep:MS`: sleeps MS milliseconds, then echoes (a slow request);
//! - `loop`: spins forever (the host must interrupt it);
//! - `oom`: allocates until memory runs out (the host must contain it);
//! - `panic`: panics (a trap);
//! - `read:PATH`: tries to read PATH; `connect:ADDR`: tries to open a TCP
//!   connection; `env`: lists environment variables. Each answers what it
//!   could see, or an invalid-input error saying what failed;
//! - `keep:SECRET`: keeps SECRET, masked, in this instance's memory;
//!   `scan:SECRET`: answers `found` if the masked SECRET is anywhere in this
//!   instance's linear memory, else `clean` (the masked form is compared on
//!   the fly, so only `keep` ever writes it), proving an instance starts
//!   with nothing an earlier one in its slot left behind.
//!
//! It exports `initialize` (world `initialized-preprocessor`), which does
//! what config `on_initialize` says: `fail` (returns an error), `hold`
//! (opens `/model/tokenizer.json` and never closes it), `loop` (spins
//! forever); anything else, or nothing, does nothing. The host must then
//! refuse to snapshot it, and serve it all the same.

use cascade::inference::types::{Error, Message, Tensor, TensorType};
use cascade_guest::Failure;
use std::sync::Mutex;

wit_bindgen::generate!({ world: "initialized-preprocessor", path: "../../wit", generate_all });
cascade_guest::component_glue!();

fn answer(text: &str) -> Vec<Tensor> {
    vec![Tensor {
        name: "echo".into(),
        dimensions: vec![text.len() as u32],
        ty: TensorType::U8,
        data: text.as_bytes().to_vec(),
    }]
}

/// What `keep` writes is SECRET with every byte XORed with this.
const MASK: u8 = 0x5a;

/// Where `keep` leaves the masked secret (on the heap, pointed to from here).
static KEPT: Mutex<Vec<u8>> = Mutex::new(Vec::new());

/// Whether SECRET, masked, occurs anywhere in linear memory.
fn memory_holds(secret: &[u8]) -> bool {
    let size = core::arch::wasm32::memory_size(0) * 65536;
    (1..size.saturating_sub(secret.len())).any(|at| {
        secret.iter().enumerate().all(|(offset, byte)| {
            // SAFETY: every address below memory_size is readable linear
            // memory; address 0 is skipped.
            let found = unsafe { std::ptr::read_volatile((at + offset) as *const u8) };
            found == byte ^ MASK
        })
    })
}

fn misbehave(input: Message) -> Result<Vec<Tensor>, Failure> {
    let command = String::from_utf8(input.body).map_err(|_| Failure::input("not UTF-8"))?;
    let (verb, argument) = command.split_once(':').unwrap_or((command.as_str(), ""));
    match verb {
        "echo" => Ok(answer(argument)),
        "print" => {
            println!("{argument}");
            eprintln!("{argument}");
            Ok(answer(argument))
        }
        "spam" => {
            let lines: u32 = argument
                .parse()
                .map_err(|_| Failure::input("spam:N takes a number"))?;
            for i in 0..lines {
                println!("spam {i}");
            }
            Ok(answer("spammed"))
        }
        "sleep" => {
            let ms: u64 = argument
                .parse()
                .map_err(|_| Failure::input("sleep:MS takes a number"))?;
            std::thread::sleep(std::time::Duration::from_millis(ms));
            Ok(answer("slept"))
        }
        "loop" => {
            let mut n: u64 = 0;
            loop {
                n = std::hint::black_box(n.wrapping_add(1));
            }
        }
        "oom" => {
            let mut hoard: Vec<Vec<u8>> = Vec::new();
            loop {
                hoard.push(vec![1u8; 1 << 20]);
                std::hint::black_box(&hoard);
            }
        }
        "panic" => panic!("asked to panic"),
        "read" => std::fs::read_to_string(argument)
            .map(|text| answer(&text))
            .map_err(|e| Failure::input(format!("read {argument}: {e}"))),
        "connect" => std::net::TcpStream::connect(argument)
            .map(|_| answer("connected"))
            .map_err(|e| Failure::input(format!("connect {argument}: {e}"))),
        "env" => Ok(answer(
            &std::env::vars()
                .map(|(k, _)| k)
                .collect::<Vec<_>>()
                .join(","),
        )),
        "keep" => {
            let masked = argument.bytes().map(|b| b ^ MASK).collect();
            *KEPT.lock().map_err(|_| Failure::internal("poisoned"))? = masked;
            Ok(answer("kept"))
        }
        "scan" if memory_holds(argument.as_bytes()) => Ok(answer("found")),
        "scan" => Ok(answer("clean")),
        other => Err(Failure::input(format!("unknown command {other:?}"))),
    }
}

struct Misbehave;

impl exports::cascade::inference::initialize::Guest for Misbehave {
    fn initialize() -> Result<(), Error> {
        let config = load_config(&["on_initialize"])?;
        match config.string("on_initialize", "").as_str() {
            "fail" => Err(Failure::internal("asked to fail in initialize").into()),
            "hold" => {
                let file = std::fs::File::open("/model/tokenizer.json")
                    .map_err(|e| Failure::internal(format!("open: {e}")))?;
                std::mem::forget(file);
                Ok(())
            }
            "loop" => {
                let mut n: u64 = 0;
                loop {
                    n = std::hint::black_box(n.wrapping_add(1));
                }
            }
            _ => Ok(()),
        }
    }
}

impl exports::cascade::inference::preprocess::Guest for Misbehave {
    fn preprocess(input: Message) -> Result<Vec<Tensor>, Error> {
        misbehave(input).map_err(Error::from)
    }
}

export!(Misbehave);
