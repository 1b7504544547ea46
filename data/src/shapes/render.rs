//! Scenes to pixels.

use rand::Rng;
use rand_chacha::ChaCha8Rng;

use super::{Scene, Shape};

fn inside(shape: Shape, dx: f32, dy: f32, r: f32) -> bool {
    match shape {
        Shape::Circle => dx * dx + dy * dy <= r * r,
        Shape::Square => dx.abs() <= r * 0.85 && dy.abs() <= r * 0.85,
        Shape::Diamond => dx.abs() + dy.abs() <= r,
        // Upward triangle: apex at (0, -r), base at y = +r.
        Shape::Triangle => dy <= r && dy >= -r && dx.abs() <= (dy + r) / 2.0,
    }
}

/// Renders a scene to RGB pixels on `background`, with optional uniform noise.
pub fn render(
    scene: &Scene,
    background: [u8; 3],
    noise: f32,
    rng: &mut ChaCha8Rng,
) -> image::RgbImage {
    let mut img = image::RgbImage::from_pixel(scene.width, scene.height, image::Rgb(background));
    for o in &scene.objects {
        let r = o.radius as f32;
        let x0 = o.x.saturating_sub(o.radius);
        let y0 = o.y.saturating_sub(o.radius);
        for y in y0..=(o.y + o.radius).min(scene.height - 1) {
            for x in x0..=(o.x + o.radius).min(scene.width - 1) {
                if inside(o.shape, x as f32 - o.x as f32, y as f32 - o.y as f32, r) {
                    img.put_pixel(x, y, image::Rgb(o.colour.rgb()));
                }
            }
        }
    }
    if noise > 0.0 {
        let amp = noise * 255.0;
        for px in img.pixels_mut() {
            for c in px.0.iter_mut() {
                let v = *c as f32 + rng.random_range(-amp..=amp);
                *c = v.round().clamp(0.0, 255.0) as u8;
            }
        }
    }
    img
}
