//! Image decoding (PNG, JPEG, WebP) and preprocessing as transformers' `CLIPImageProcessor`
//! does it: convert to RGB, resize (shortest edge, bicubic), center-crop, rescale, normalise.

use std::path::Path;

use candle_core::{Device, Tensor};
pub use image::ImageFormat;
use image::{DynamicImage, imageops::FilterType};
use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};

pub const PREPROCESSOR_FILE: &str = "preprocessor_config.json";

/// `size` / `crop_size`: `{"shortest_edge": n}`, `{"height": h, "width": w}`, or a bare int.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum SizeSpec {
    ShortestEdge { shortest_edge: u32 },
    HeightWidth { height: u32, width: u32 },
    Square(u32),
}

/// `preprocessor_config.json` of a `CLIPImageProcessor`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageProcessorConfig {
    #[serde(default = "yes")]
    pub do_resize: bool,
    pub size: SizeSpec,
    /// PIL resampling filter: 0 nearest, 2 bilinear, 3 bicubic (default), 1 lanczos.
    #[serde(default = "bicubic")]
    pub resample: u32,
    #[serde(default = "yes")]
    pub do_center_crop: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crop_size: Option<SizeSpec>,
    #[serde(default = "yes")]
    pub do_rescale: bool,
    #[serde(default = "default_rescale")]
    pub rescale_factor: f64,
    #[serde(default = "yes")]
    pub do_normalize: bool,
    #[serde(default = "clip_mean")]
    pub image_mean: Vec<f32>,
    #[serde(default = "clip_std")]
    pub image_std: Vec<f32>,
    #[serde(default = "yes")]
    pub do_convert_rgb: bool,
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

fn yes() -> bool {
    true
}
fn bicubic() -> u32 {
    3
}
fn default_rescale() -> f64 {
    1.0 / 255.0
}
pub fn clip_mean() -> Vec<f32> {
    vec![0.481_454_66, 0.457_827_5, 0.408_210_73]
}
pub fn clip_std() -> Vec<f32> {
    vec![0.268_629_54, 0.261_302_6, 0.275_777_1]
}

impl ImageProcessorConfig {
    /// CLIP's settings for square images of `side` pixels.
    pub fn clip(side: u32) -> Self {
        Self {
            do_resize: true,
            size: SizeSpec::ShortestEdge {
                shortest_edge: side,
            },
            resample: 3,
            do_center_crop: true,
            crop_size: Some(SizeSpec::HeightWidth {
                height: side,
                width: side,
            }),
            do_rescale: true,
            rescale_factor: default_rescale(),
            do_normalize: true,
            image_mean: clip_mean(),
            image_std: clip_std(),
            do_convert_rgb: true,
            extra: serde_json::Map::from_iter([(
                "image_processor_type".to_string(),
                serde_json::Value::from("CLIPImageProcessor"),
            )]),
        }
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        let cfg: Self = serde_json::from_str(&text).map_err(|source| ModelError::Json {
            path: path.to_path_buf(),
            source,
        })?;
        cfg.validate()
            .map_err(|e| ModelError::config(path.display().to_string(), e.to_string()))?;
        Ok(cfg)
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let text =
            serde_json::to_string_pretty(self).map_err(|e| ModelError::input(e.to_string()))?;
        crate::checkpoint::write_atomic(path, text.as_bytes())
    }

    pub fn validate(&self) -> Result<()> {
        if self.image_mean.len() != 3 || self.image_std.len() != 3 {
            return Err(ModelError::config(
                "image_mean/image_std",
                "need 3 values each (RGB)",
            ));
        }
        if self.image_std.iter().any(|s| *s == 0.0 || !s.is_finite()) {
            return Err(ModelError::config(
                "image_std",
                "values must be finite and non-zero",
            ));
        }
        Ok(())
    }

    fn filter(&self) -> FilterType {
        match self.resample {
            0 => FilterType::Nearest,
            2 => FilterType::Triangle,
            1 => FilterType::Lanczos3,
            _ => FilterType::CatmullRom,
        }
    }

    /// Output `(height, width)` after resize for an input of `(h, w)`, in u64: an extreme aspect
    /// ratio can make the long side larger than any image (see [`MAX_PIXELS`]).
    fn resized_dims(&self, h: u32, w: u32) -> (u64, u64) {
        match &self.size {
            SizeSpec::ShortestEdge { shortest_edge: s } | SizeSpec::Square(s)
                if matches!(self.size, SizeSpec::ShortestEdge { .. }) || !self.do_center_crop =>
            {
                let (short, long) = if h <= w { (h, w) } else { (w, h) };
                let new_long = (*s as u64 * long as u64) / short.max(1) as u64;
                if h <= w {
                    (u64::from(*s), new_long)
                } else {
                    (new_long, u64::from(*s))
                }
            }
            SizeSpec::Square(s) => (u64::from(*s), u64::from(*s)),
            SizeSpec::HeightWidth { height, width } => (u64::from(*height), u64::from(*width)),
            SizeSpec::ShortestEdge { .. } => unreachable!("covered by the first arm"),
        }
    }
}

/// RGB conversion as transformers does it: an image with an alpha channel is composited onto
/// white (`convert_to_rgb`), grey is replicated to three channels.
pub fn to_rgb(img: &DynamicImage) -> image::RgbImage {
    if !img.color().has_alpha() {
        return img.to_rgb8();
    }
    let rgba = img.to_rgba8();
    let mut out = image::RgbImage::new(rgba.width(), rgba.height());
    for (x, y, px) in rgba.enumerate_pixels() {
        let a = px.0[3] as u32;
        let mut rgb = [0u8; 3];
        for c in 0..3 {
            let v = px.0[c] as u32 * a + 255 * (255 - a);
            rgb[c] = ((v + 127) / 255) as u8;
        }
        out.put_pixel(x, y, image::Rgb(rgb));
    }
    out
}

/// The most pixels an image may have after resizing (32 Mi: 384 MiB as f32 RGB). Real inputs
/// are far smaller; the bound stops extreme aspect ratios from asking for terabytes.
pub const MAX_PIXELS: u64 = 1 << 25;

/// Decodes and preprocesses images for one model.
#[derive(Debug, Clone)]
pub struct ImageProcessor {
    pub config: ImageProcessorConfig,
}

impl ImageProcessor {
    pub fn new(config: ImageProcessorConfig) -> Result<Self> {
        config.validate()?;
        Ok(Self { config })
    }

    /// Decodes encoded bytes (PNG/JPEG/WebP); `name` (a path or row id) is used in errors.
    pub fn decode(bytes: &[u8], name: &str) -> Result<DynamicImage> {
        if bytes.is_empty() {
            return Err(ModelError::Image {
                name: name.into(),
                reason: "empty file".into(),
            });
        }
        image::load_from_memory(bytes).map_err(|e| ModelError::Image {
            name: name.into(),
            reason: format!("cannot decode: {e}"),
        })
    }

    /// Pixel values `[3, H, W]` (f32) for an encoded image.
    pub fn preprocess_bytes(&self, bytes: &[u8], name: &str, device: &Device) -> Result<Tensor> {
        let img = Self::decode(bytes, name)?;
        self.preprocess(&img, name, device)
    }

    pub fn preprocess_file(&self, path: &Path, device: &Device) -> Result<Tensor> {
        let bytes = std::fs::read(path).map_err(|e| ModelError::io(path, e))?;
        self.preprocess_bytes(&bytes, &path.display().to_string(), device)
    }

    pub fn preprocess(&self, img: &DynamicImage, name: &str, device: &Device) -> Result<Tensor> {
        let c = &self.config;
        if img.width() == 0 || img.height() == 0 {
            return Err(ModelError::Image {
                name: name.into(),
                reason: "image has no pixels".into(),
            });
        }
        // The image after resizing (or as it is) must stay within MAX_PIXELS: a 1,000,000 x 1
        // PNG is a few kilobytes, but resized to a 224-pixel shortest edge it would be 224 x
        // 224,000,000 pixels, an allocation that aborts the process.
        let (h, w) = if c.do_resize {
            c.resized_dims(img.height(), img.width())
        } else {
            (u64::from(img.height()), u64::from(img.width()))
        };
        if h.saturating_mul(w) > MAX_PIXELS {
            return Err(ModelError::Image {
                name: name.into(),
                reason: format!(
                    "{}x{} pixels would be {w}x{h} after resizing, over the limit of {MAX_PIXELS} \
                     pixels (the aspect ratio is too extreme)",
                    img.width(),
                    img.height()
                ),
            });
        }
        let mut rgb = to_rgb(img);
        if (h, w) != (u64::from(rgb.height()), u64::from(rgb.width())) {
            // Both fit in u32: their product is at most MAX_PIXELS.
            rgb = image::imageops::resize(&rgb, w as u32, h as u32, c.filter());
        }
        if c.do_center_crop
            && let Some(crop) = &c.crop_size
        {
            let (ch, cw) = match crop {
                SizeSpec::HeightWidth { height, width } => (*height, *width),
                SizeSpec::Square(s) | SizeSpec::ShortestEdge { shortest_edge: s } => (*s, *s),
            };
            let (h, w) = (rgb.height(), rgb.width());
            if ch > h || cw > w {
                return Err(ModelError::Image {
                    name: name.into(),
                    reason: format!("{w}x{h} after resizing is smaller than the {cw}x{ch} crop"),
                });
            }
            let top = (h - ch) / 2;
            let left = (w - cw) / 2;
            rgb = image::imageops::crop_imm(&rgb, left, top, cw, ch).to_image();
        }
        let (h, w) = (rgb.height() as usize, rgb.width() as usize);
        let mut data = vec![0f32; 3 * h * w];
        let scale = if c.do_rescale {
            c.rescale_factor as f32
        } else {
            1.0
        };
        for (x, y, px) in rgb.enumerate_pixels() {
            for ch in 0..3 {
                let mut v = px.0[ch] as f32 * scale;
                if c.do_normalize {
                    v = (v - c.image_mean[ch]) / c.image_std[ch];
                }
                data[ch * h * w + y as usize * w + x as usize] = v;
            }
        }
        Ok(Tensor::from_vec(data, (3, h, w), device)?)
    }
}
