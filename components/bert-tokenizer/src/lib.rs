//! `bert-tokenizer`: text in, `input_ids` and `attention_mask` out.
//!
//! Generic over any Hugging Face `tokenizer.json` (WordPiece, BPE, Unigram):
//! the file comes read-only from the stage's model package, so the same
//! component serves every BERT-family model.
//!
//! Input: `text/plain` (one text) or `application/json` with
//! `{"inputs": "…"}` or `{"inputs": ["…", …]}`. Output: int64 tensors of
//! shape batch × sequence, padded to the longest input and truncated to
//! `max_length`.
//!
//! Config: `tokenizer` (path, default `/model/tokenizer.json`),
//! `max_length` (default 128), `max_batch` (default 64),
//! `token_type_ids` (also emit `token_type_ids`, default false),
//! `pad_to_multiple_of` (pad the sequence up to a multiple of this, which
//! must divide `max_length`; default 1: no extra padding). Padding to a few
//! lengths lets the host reuse a model plan made for each length; the
//! attention mask keeps the padding out of the result.

use cascade::inference::types::{Error, Message, Tensor, TensorType};
use cascade_guest::{Failure, PerInstance, le};
use tokenizers::{NormalizerWrapper, PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

wit_bindgen::generate!({ world: "initialized-preprocessor", path: "../../wit", generate_all });
cascade_guest::component_glue!();

const KEYS: &[&str] = &[
    "tokenizer",
    "max_length",
    "max_batch",
    "token_type_ids",
    "pad_to_multiple_of",
];

/// What one instance keeps between calls: loading tokenizer.json is the
/// expensive part, so it happens once per instance.
struct Prepared {
    tokenizer: Tokenizer,
    ascii: Option<AsciiPath>,
    max_batch: usize,
    token_type_ids: bool,
}

/// A quicker way through a `BertNormalizer` for ASCII texts, where all it
/// does is drop control characters, turn tabs and line breaks into spaces
/// and lowercase (Chinese characters, accents and Unicode case cannot
/// occur). Doing that on the text directly and tokenizing with no
/// normalizer gives the same tokens without the normalizer's per-character
/// alignment bookkeeping: at 128 tokens that was 70 of 180 µs natively.
struct AsciiPath {
    /// The same tokenizer without its normalizer.
    tokenizer: Tokenizer,
    clean_text: bool,
    lowercase: bool,
    /// Added tokens (`[CLS]`, `[MASK]`, ...), lowercased: a text holding one
    /// takes the full path, since they are matched before normalizing.
    added: Vec<String>,
}

impl AsciiPath {
    fn for_tokenizer(tokenizer: &Tokenizer) -> Option<AsciiPath> {
        let Some(NormalizerWrapper::BertNormalizer(bert)) = tokenizer.get_normalizer() else {
            return None;
        };
        let (clean_text, lowercase) = (bert.clean_text, bert.lowercase);
        let mut plain = tokenizer.clone();
        plain.with_normalizer(None::<NormalizerWrapper>);
        Some(AsciiPath {
            tokenizer: plain,
            clean_text,
            lowercase,
            added: tokenizer
                .get_added_tokens_decoder()
                .values()
                .map(|token| token.content.to_ascii_lowercase())
                .collect(),
        })
    }

    /// `text` as the `BertNormalizer` would leave it, when it can take this path.
    fn normalize(&self, text: &str) -> Option<String> {
        if !text.is_ascii() {
            return None;
        }
        let lowered = text.to_ascii_lowercase();
        if self
            .added
            .iter()
            .any(|token| lowered.contains(token.as_str()))
        {
            return None;
        }
        let source = if self.lowercase {
            lowered
        } else {
            text.to_string()
        };
        if !self.clean_text {
            return Some(source);
        }
        Some(
            source
                .chars()
                .filter_map(|c| match c {
                    '\t' | '\n' | '\r' => Some(' '),
                    c if c.is_ascii_control() => None,
                    c => Some(c),
                })
                .collect(),
        )
    }
}

static PREPARED: PerInstance<Prepared> = PerInstance::new();

fn prepare() -> Result<Prepared, Failure> {
    let config = load_config(KEYS)?;
    let path = config.string("tokenizer", "/model/tokenizer.json");
    let max_length: usize = config.parse("max_length", 128)?;
    if max_length < 2 {
        return Err(Failure::internal("config `max_length` must be at least 2"));
    }
    let multiple: usize = config.parse("pad_to_multiple_of", 1)?;
    if multiple == 0 || max_length % multiple != 0 {
        return Err(Failure::internal(format!(
            "config `pad_to_multiple_of` ({multiple}) must divide `max_length` ({max_length})"
        )));
    }
    let mut tokenizer = Tokenizer::from_file(&path)
        .map_err(|e| Failure::internal(format!("loading tokenizer {path}: {e}")))?;
    let pad = tokenizer.get_padding().cloned().unwrap_or_default();
    tokenizer.with_padding(Some(PaddingParams {
        strategy: PaddingStrategy::BatchLongest,
        pad_to_multiple_of: (multiple > 1).then_some(multiple),
        ..pad
    }));
    tokenizer
        .with_truncation(Some(TruncationParams {
            max_length,
            ..TruncationParams::default()
        }))
        .map_err(|e| Failure::internal(format!("truncation settings: {e}")))?;
    Ok(Prepared {
        ascii: AsciiPath::for_tokenizer(&tokenizer),
        tokenizer,
        max_batch: config.parse("max_batch", 64)?,
        token_type_ids: config.flag("token_type_ids", false)?,
    })
}

/// The texts of a request, by content type.
fn texts(input: &Message) -> Result<Vec<String>, Failure> {
    if input.body.is_empty() {
        return Err(Failure::input(
            "empty body: send text, or JSON {\"inputs\": [...]}",
        ));
    }
    let body = std::str::from_utf8(&input.body)
        .map_err(|e| Failure::input(format!("body is not valid UTF-8: {e}")))?;
    let media_type = input.content_type.split(';').next().unwrap_or("").trim();
    if !media_type.eq_ignore_ascii_case("application/json") {
        return Ok(vec![body.to_string()]);
    }
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum Inputs {
        One(String),
        Many(Vec<String>),
    }
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Request {
        inputs: Inputs,
    }
    let request: Request = serde_json::from_str(body).map_err(|e| {
        Failure::input(format!(
            "invalid JSON ({e}): expected {{\"inputs\": \"text\"}} or {{\"inputs\": [\"text\", ...]}}"
        ))
    })?;
    let texts = match request.inputs {
        Inputs::One(text) => vec![text],
        Inputs::Many(texts) => texts,
    };
    if texts.is_empty() {
        return Err(Failure::input("`inputs` is an empty list"));
    }
    Ok(texts)
}

fn tokenize(input: Message) -> Result<Vec<Tensor>, Failure> {
    let prepared = PREPARED.get(prepare)?;
    let texts = texts(&input)?;
    if texts.len() > prepared.max_batch {
        return Err(Failure::input(format!(
            "{} inputs exceed the batch limit of {}",
            texts.len(),
            prepared.max_batch
        )));
    }
    let ascii = prepared.ascii.as_ref().and_then(|path| {
        let normalized: Option<Vec<String>> = texts.iter().map(|t| path.normalize(t)).collect();
        Some((&path.tokenizer, normalized?))
    });
    let (tokenizer, texts) = ascii.unwrap_or((&prepared.tokenizer, texts));
    let encodings = tokenizer
        .encode_batch(texts, true)
        .map_err(|e| Failure::internal(format!("tokenizing: {e}")))?;
    let batch = encodings.len();
    let seq = encodings.first().map_or(0, |e| e.len());
    let column = |pick: fn(&tokenizers::Encoding) -> &[u32]| -> Vec<i64> {
        encodings
            .iter()
            .flat_map(|e| pick(e).iter().map(|&v| i64::from(v)))
            .collect()
    };
    let tensor = |name: &str, values: Vec<i64>| Tensor {
        name: name.to_string(),
        dimensions: vec![batch as u32, seq as u32],
        ty: TensorType::I64,
        data: le::from_i64s(&values),
    };
    let mut out = vec![
        tensor("input_ids", column(|e| e.get_ids())),
        tensor("attention_mask", column(|e| e.get_attention_mask())),
    ];
    if prepared.token_type_ids {
        out.push(tensor("token_type_ids", column(|e| e.get_type_ids())));
    }
    Ok(out)
}

struct BertTokenizer;

/// Parsing `tokenizer.json` is ~20 ms of a new instance's first call; a
/// host that snapshots this instance afterwards starts the others parsed.
impl exports::cascade::inference::initialize::Guest for BertTokenizer {
    fn initialize() -> Result<(), Error> {
        PREPARED.initialize(prepare).map_err(Into::into)
    }
}

impl exports::cascade::inference::preprocess::Guest for BertTokenizer {
    fn preprocess(input: Message) -> Result<Vec<Tensor>, Error> {
        tokenize(input).map_err(Error::from)
    }
}

export!(BertTokenizer);
