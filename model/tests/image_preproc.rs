//! Decoding and CLIP preprocessing agree with transformers' PIL-based `CLIPImageProcessor`
//! (fixtures from tools/parity/make_fixtures.py).
//!
//! Without a resize the pipeline is exact. Resizing uses the `image` crate's Catmull-Rom
//! (bicubic a = -0.5, antialiased like PIL's) on 8-bit data; PIL's fixed-point arithmetic and
//! rounding differ slightly, so resized images are compared with a tolerance in 8-bit levels.

mod common;

use candle_core::{Device, Tensor};
use ril_model::image::{ImageProcessor, ImageProcessorConfig};

/// One 8-bit level in normalised units is 1 / (255 * std) ~ 0.015.
const LEVEL: f32 = 1.0 / (255.0 * 0.2613);

fn processor() -> ImageProcessor {
    let dir = common::fixtures().join("image_preproc");
    ImageProcessor::new(
        ImageProcessorConfig::from_file(&dir.join("preprocessor_config.json")).unwrap(),
    )
    .unwrap()
}

fn diff(name: &str) -> (f32, f32) {
    let dir = common::fixtures().join("image_preproc");
    let expected =
        candle_core::safetensors::load(dir.join("pixel_values.safetensors"), &Device::Cpu).unwrap();
    let ours = processor()
        .preprocess_file(&dir.join(name), &Device::Cpu)
        .unwrap();
    let theirs: &Tensor = &expected[name];
    assert_eq!(ours.dims(), theirs.dims(), "{name}");
    let d = (ours - theirs).unwrap().abs().unwrap();
    let max = d.max_all().unwrap().to_scalar::<f32>().unwrap();
    let mean = d.mean_all().unwrap().to_scalar::<f32>().unwrap();
    (max, mean)
}

#[test]
fn unresized_png_is_exact() {
    let (max, _) = diff("rgb_16x16.png");
    assert!(max < 1e-6, "max diff {max}");
}

#[test]
fn rgba_is_composited_onto_white_like_transformers() {
    let dir = common::fixtures().join("image_preproc");
    let inter = candle_core::safetensors::load(dir.join("intermediates.safetensors"), &Device::Cpu)
        .unwrap();
    let expected: Vec<u8> = inter["rgba_40x30.png/decoded_rgb_hwc_u8"]
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let img = ImageProcessor::decode(&std::fs::read(dir.join("rgba_40x30.png")).unwrap(), "rgba")
        .unwrap();
    let ours = ril_model::image::to_rgb(&img).into_raw();
    let worst = ours
        .iter()
        .zip(&expected)
        .map(|(a, b)| a.abs_diff(*b))
        .max()
        .unwrap();
    assert!(worst <= 1, "RGB conversion differs by {worst} levels");
}

#[test]
fn resized_images_match_within_a_few_levels() {
    for name in ["rgba_40x30.png", "rgb_30x50.jpg", "gray_24x24.png"] {
        let (max, mean) = diff(name);
        eprintln!(
            "{name}: max {:.2} levels, mean {:.3} levels",
            max / LEVEL,
            mean / LEVEL
        );
        assert!(
            max <= 3.0 * LEVEL,
            "{name}: max diff {} levels",
            max / LEVEL
        );
        assert!(
            mean <= 0.5 * LEVEL,
            "{name}: mean diff {} levels",
            mean / LEVEL
        );
    }
}

#[test]
fn corrupt_and_empty_images_are_named_errors() {
    let dir = common::fixtures().join("image_preproc");
    let mut bytes = std::fs::read(dir.join("rgb_16x16.png")).unwrap();
    bytes.truncate(bytes.len() / 2);
    let p = processor();
    let err = p
        .preprocess_bytes(&bytes, "row 7 image 0", &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("row 7 image 0") && err.contains("decode"),
        "{err}"
    );
    let err = p
        .preprocess_bytes(&[], "empty.png", &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("empty.png") && err.contains("empty"), "{err}");
    let err = p
        .preprocess_bytes(b"not an image at all", "x.webp", &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("x.webp"), "{err}");
}

/// A 1,000,000 x 1 PNG is a few kilobytes but resized to CLIP's 224-pixel shortest edge it would
/// be 224 x 224,000,000 pixels: refused with its name instead of an allocation that aborts.
#[test]
fn extreme_aspect_ratios_are_refused_before_resizing() {
    let img = image::RgbImage::from_pixel(1_000_000, 1, image::Rgb([9, 9, 9]));
    let mut png = std::io::Cursor::new(Vec::new());
    img.write_to(&mut png, image::ImageFormat::Png).unwrap();
    let png = png.into_inner();
    assert!(png.len() < 100_000, "{}", png.len());
    let p = ImageProcessor::new(ImageProcessorConfig::clip(224)).unwrap();
    let err = p
        .preprocess_bytes(&png, "long.png", &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("long.png") && err.contains("1000000x1") && err.contains("limit"),
        "{err}"
    );
    // An ordinary wide image still resizes.
    let wide = image::RgbImage::from_pixel(300, 20, image::Rgb([9, 9, 9]));
    let mut png = std::io::Cursor::new(Vec::new());
    wide.write_to(&mut png, image::ImageFormat::Png).unwrap();
    let t = p
        .preprocess_bytes(&png.into_inner(), "wide.png", &Device::Cpu)
        .unwrap();
    assert_eq!(t.dims(), &[3, 224, 224]);
}
