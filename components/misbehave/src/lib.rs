//! `misbehave`: a test-only preprocessor that does what its input says, so
//! the end-to-end tests can prove a bad guest cannot hurt the host.
//!
//! - `echo:TEXT`: answers a u8 tensor `echo` holding TEXT;
//! - `print:TEXT`: writes TEXT to stdout and stderr, then echoes it;
//! - `sleep:MS`: sleeps MS milliseconds, then echoes (a slow request);
//! - `loop`: spins forever (the host must interrupt it);
//! - `oom`: allocates until memory runs out (the host must contain it);
//! - `panic`: panics (a trap);
//! - `read:PATH`: tries to read PATH; `connect:ADDR`: tries to open a TCP
//!   connection; `env`: lists environment variables. Each answers what it
//!   could see, or an invalid-input error saying what failed.

use cascade::inference::types::{Error, Message, Tensor, TensorType};
use cascade_guest::Failure;

wit_bindgen::generate!({ world: "preprocessor", path: "../../wit", generate_all });
cascade_guest::component_glue!();

fn answer(text: &str) -> Vec<Tensor> {
    vec![Tensor {
        name: "echo".into(),
        dimensions: vec![text.len() as u32],
        ty: TensorType::U8,
        data: text.as_bytes().to_vec(),
    }]
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
        other => Err(Failure::input(format!("unknown command {other:?}"))),
    }
}

struct Misbehave;

impl exports::cascade::inference::preprocess::Guest for Misbehave {
    fn preprocess(input: Message) -> Result<Vec<Tensor>, Error> {
        misbehave(input).map_err(Error::from)
    }
}

export!(Misbehave);
