//! `image-preprocess`: PNG or JPEG bytes in, one normalised NCHW fp32 tensor out.
//!
//! Geometry (`resize`):
//! - `center-crop` (default): scale so the shorter side is `shorter_side`
//!   (default: the larger of `width` and `height`), then cut the centre
//!   `width` × `height` — the ImageNet recipe.
//! - `pad`: scale to `height` keeping the aspect ratio, at most `width` wide,
//!   and fill the rest of the row with zeros after normalisation — the
//!   PP-OCR text-line recipe.
//! - `stretch`: scale to `width` × `height` ignoring the aspect ratio.
//!
//! Values: each channel becomes `(pixel * scale - mean) / std`.
//!
//! Config: `width`, `height` (default 224), `resize`, `shorter_side`,
//! `filter` (`triangle` default, `nearest`, `catmull-rom`), `scale`
//! (default 1/255), `mean` and `std` (three comma-separated numbers each,
//! default 0,0,0 and 1,1,1), `channel_order` (`rgb` default or `bgr`),
//! `tensor` (output name, default `input`), `max_pixels` (decode limit,
//! default 4096 × 4096).

use cascade::inference::types::{Error, Message, Tensor, TensorType};
use cascade_guest::{Config, Failure, PerInstance};
use fast_image_resize::images::{Image, ImageRef};
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use image::imageops;
use image::{DynamicImage, ImageDecoder, ImageReader, Limits, RgbImage};
use std::io::Cursor;

wit_bindgen::generate!({ world: "preprocessor", path: "../../wit", generate_all });
cascade_guest::component_glue!();

const KEYS: &[&str] = &[
    "width",
    "height",
    "resize",
    "shorter_side",
    "filter",
    "scale",
    "mean",
    "std",
    "channel_order",
    "tensor",
    "max_pixels",
];

/// The geometry step, chosen by `resize`.
enum Geometry {
    CenterCrop { shorter_side: u32 },
    Pad,
    Stretch,
}

/// Everything a request needs from the configuration, parsed once per call.
struct Recipe {
    width: u32,
    height: u32,
    geometry: Geometry,
    filter: ResizeAlg,
    bgr: bool,
    tensor: String,
    max_pixels: u64,
    /// Per output channel, the normalised value of each of the 256 pixel
    /// levels as little-endian bytes: `(level * scale - mean) / std`, the
    /// same arithmetic as value by value, done once per instance.
    levels: [[[u8; 4]; 256]; 3],
}

impl Recipe {
    fn from_config(config: &Config) -> Result<Self, Failure> {
        let width: u32 = config.parse("width", 224)?;
        let height: u32 = config.parse("height", 224)?;
        if width == 0 || height == 0 || u64::from(width) * u64::from(height) > 1 << 24 {
            return Err(Failure::internal(
                "config `width` × `height` must be between 1 and 2^24 pixels",
            ));
        }
        let geometry = match config.string("resize", "center-crop").as_str() {
            "center-crop" => Geometry::CenterCrop {
                shorter_side: config
                    .parse("shorter_side", width.max(height))?
                    .max(width.max(height)),
            },
            "pad" => Geometry::Pad,
            "stretch" => Geometry::Stretch,
            other => {
                return Err(Failure::internal(format!(
                    "config `resize`: {other:?} is not center-crop, pad or stretch"
                )));
            }
        };
        let filter = match config.string("filter", "triangle").as_str() {
            "triangle" => ResizeAlg::Convolution(FilterType::Bilinear),
            "nearest" => ResizeAlg::Nearest,
            "catmull-rom" => ResizeAlg::Convolution(FilterType::CatmullRom),
            other => {
                return Err(Failure::internal(format!(
                    "config `filter`: {other:?} is not triangle, nearest or catmull-rom"
                )));
            }
        };
        let bgr = match config.string("channel_order", "rgb").as_str() {
            "rgb" => false,
            "bgr" => true,
            other => {
                return Err(Failure::internal(format!(
                    "config `channel_order`: {other:?} is not rgb or bgr"
                )));
            }
        };
        let std = config.floats("std", 3, &[1.0, 1.0, 1.0])?;
        if std.contains(&0.0) {
            return Err(Failure::internal("config `std` must not contain 0"));
        }
        let scale: f32 = config.parse("scale", 1.0 / 255.0)?;
        let mean = config.floats("mean", 3, &[0.0, 0.0, 0.0])?;
        let levels = std::array::from_fn(|c| {
            std::array::from_fn(|level| {
                let value = level as f32 * scale;
                ((value - mean[c]) / std[c]).to_le_bytes()
            })
        });
        Ok(Recipe {
            width,
            height,
            geometry,
            filter,
            bgr,
            tensor: config.string("tensor", "input"),
            max_pixels: config.parse("max_pixels", 4096 * 4096)?,
            levels,
        })
    }
}

fn decode(body: &[u8], max_pixels: u64) -> Result<RgbImage, Failure> {
    if body.is_empty() {
        return Err(Failure::input("empty body: send a PNG or JPEG image"));
    }
    let undecodable = |e: image::ImageError| Failure::input(format!("undecodable image: {e}"));
    let reader = ImageReader::new(Cursor::new(body))
        .with_guessed_format()
        .map_err(|e| Failure::input(format!("reading image: {e}")))?;
    if reader.format().is_none() {
        return Err(Failure::input("body is not a PNG or JPEG image"));
    }
    // One pass over the header: the size is checked against `max_pixels`
    // before the decoder may allocate for the pixels.
    let mut decoder = reader.into_decoder().map_err(undecodable)?;
    let (w, h) = decoder.dimensions();
    if u64::from(w) * u64::from(h) > max_pixels {
        return Err(Failure::input(format!(
            "image of {w}×{h} pixels exceeds the limit of {max_pixels} pixels"
        )));
    }
    let mut limits = Limits::default();
    limits.max_alloc = Some(max_pixels.saturating_mul(8));
    decoder.set_limits(limits).map_err(undecodable)?;
    // `into_rgb8` keeps an RGB8 image's buffer instead of copying it.
    Ok(DynamicImage::from_decoder(decoder)
        .map_err(undecodable)?
        .into_rgb8())
}

/// Applies the geometry; returns the image and how many columns hold pixels
/// (the rest, in `pad` mode, are padding).
fn reshape(image: &RgbImage, recipe: &Recipe) -> Result<(RgbImage, u32), Failure> {
    let (w, h) = image.dimensions();
    Ok(match recipe.geometry {
        Geometry::Stretch => (
            resize(image, recipe.width, recipe.height, recipe.filter)?,
            recipe.width,
        ),
        Geometry::Pad => {
            let scaled = (f64::from(recipe.height) * f64::from(w) / f64::from(h)).ceil() as u32;
            let resized_w = scaled.clamp(1, recipe.width);
            (
                resize(image, resized_w, recipe.height, recipe.filter)?,
                resized_w,
            )
        }
        Geometry::CenterCrop { shorter_side } => {
            let ratio = f64::from(shorter_side) / f64::from(w.min(h));
            let (rw, rh) = (
                ((f64::from(w) * ratio).round() as u32).max(recipe.width),
                ((f64::from(h) * ratio).round() as u32).max(recipe.height),
            );
            let resized = if (rw, rh) == (w, h) {
                image.clone()
            } else {
                resize(image, rw, rh, recipe.filter)?
            };
            let (x, y) = ((rw - recipe.width) / 2, (rh - recipe.height) / 2);
            let cropped =
                imageops::crop_imm(&resized, x, y, recipe.width, recipe.height).to_image();
            (cropped, recipe.width)
        }
    })
}

/// Resizes RGB8 pixels with fixed-point convolution.
fn resize(
    image: &RgbImage,
    width: u32,
    height: u32,
    filter: ResizeAlg,
) -> Result<RgbImage, Failure> {
    let failed = |e: &dyn std::fmt::Display| Failure::internal(format!("resizing: {e}"));
    let (w, h) = image.dimensions();
    let source = ImageRef::new(w, h, image.as_raw(), PixelType::U8x3).map_err(|e| failed(&e))?;
    let mut target = Image::new(width, height, PixelType::U8x3);
    Resizer::new()
        .resize(
            &source,
            &mut target,
            &ResizeOptions::new().resize_alg(filter),
        )
        .map_err(|e| failed(&e))?;
    RgbImage::from_raw(width, height, target.into_vec())
        .ok_or_else(|| failed(&"the resized buffer has the wrong size"))
}

/// Normalises into planar channels of `width` × `height` as little-endian
/// `f32` bytes, zero beyond `filled` columns.
fn to_nchw(image: &RgbImage, filled: u32, recipe: &Recipe) -> Vec<u8> {
    let (w, h) = (recipe.width as usize, recipe.height as usize);
    let plane = w * h;
    let mut out = vec![0u8; 4 * 3 * plane];
    let row_len = (image.width() as usize * 3).max(3);
    let filled = (filled as usize).min(w);
    for (y, row) in image.as_raw().chunks_exact(row_len).take(h).enumerate() {
        for (x, pixel) in row.chunks_exact(3).take(filled).enumerate() {
            for (c, levels) in recipe.levels.iter().enumerate() {
                let source = if recipe.bgr { 2 - c } else { c };
                let at = 4 * (c * plane + y * w + x);
                out[at..at + 4].copy_from_slice(&levels[usize::from(pixel[source])]);
            }
        }
    }
    out
}

/// The recipe, parsed from the configuration once per instance.
static RECIPE: PerInstance<Recipe> = PerInstance::new();

fn preprocess(input: Message) -> Result<Vec<Tensor>, Failure> {
    let recipe = RECIPE.get(|| Recipe::from_config(&load_config(KEYS)?))?;
    let image = decode(&input.body, recipe.max_pixels)?;
    let (shaped, filled) = reshape(&image, recipe)?;
    Ok(vec![Tensor {
        name: recipe.tensor.clone(),
        dimensions: vec![1, 3, recipe.height, recipe.width],
        ty: TensorType::Fp32,
        data: to_nchw(&shaped, filled, recipe),
    }])
}

struct ImagePreprocess;

impl exports::cascade::inference::preprocess::Guest for ImagePreprocess {
    fn preprocess(input: Message) -> Result<Vec<Tensor>, Error> {
        preprocess(input).map_err(Error::from)
    }
}

export!(ImagePreprocess);
