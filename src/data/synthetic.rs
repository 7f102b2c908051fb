//! CIFAR-shaped images made procedurally: ten classes of coloured shapes and textures on noisy
//! backgrounds, seeded, any number. Tests use them as fixtures; a small CNN learns them quickly.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::cifar::{IMAGE_BYTES, SIDE};
use super::images::{ImageSet, CHANNELS};

/// One foreground colour per class, so colour alone is a clue and shape is another.
const PALETTE: [[f32; 3]; 10] = [
    [230., 60., 60.],
    [60., 200., 60.],
    [70., 90., 240.],
    [230., 220., 60.],
    [200., 70., 220.],
    [60., 220., 220.],
    [240., 150., 50.],
    [150., 150., 150.],
    [250., 250., 250.],
    [120., 60., 30.],
];

/// The classes' names, in label order: what each shape looks like.
pub const CLASSES: [&str; 10] = [
    "rows",
    "columns",
    "checks",
    "disc",
    "ring",
    "square",
    "diagonals",
    "cross",
    "diamond",
    "dots",
];

/// Whether pixel (x, y), shifted by the image's random offset, belongs to class `label`'s shape.
fn in_shape(label: u32, x: i32, y: i32) -> bool {
    let (cx, cy) = (x - 16, y - 16);
    let r2 = cx * cx + cy * cy;
    match label {
        0 => (y / 4) % 2 == 0,
        1 => (x / 4) % 2 == 0,
        2 => ((x / 4) + (y / 4)) % 2 == 0,
        3 => r2 < 100,
        4 => (49..144).contains(&r2),
        5 => cx.abs() < 9 && cy.abs() < 9,
        6 => ((x + y) / 4) % 2 == 0,
        7 => cx.abs() < 3 || cy.abs() < 3,
        8 => cx.abs() + cy.abs() < 11,
        _ => x % 8 < 3 && y % 8 < 3,
    }
}

/// `count` images with labels cycling 0..=9, the same for the same seed.
pub fn generate(count: usize, seed: u64) -> ImageSet {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut set = ImageSet::with_capacity(count, SIDE);
    let mut image = vec![0u8; IMAGE_BYTES];
    for i in 0..count {
        let label = (i % PALETTE.len()) as u32;
        let background: [f32; 3] = std::array::from_fn(|_| rng.random_range(0.0..110.0));
        let (dx, dy) = (rng.random_range(-3..=3), rng.random_range(-3..=3));
        for y in 0..SIDE {
            for x in 0..SIDE {
                let inside = in_shape(label, x as i32 + dx, y as i32 + dy);
                for c in 0..CHANNELS {
                    let base = if inside {
                        PALETTE[label as usize][c]
                    } else {
                        background[c]
                    };
                    let noisy = base + rng.random_range(-30.0..30.0);
                    image[c * SIDE * SIDE + y * SIDE + x] = noisy.clamp(0.0, 255.0) as u8;
                }
            }
        }
        set.push(&image, label);
    }
    set
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeded_balanced_and_varied() {
        let a = generate(40, 5);
        assert_eq!(a, generate(40, 5));
        assert_ne!(a, generate(40, 6));
        assert_eq!(a.labels().iter().filter(|&&l| l == 3).count(), 4);
        assert_ne!(a.image(0), a.image(10), "two images of one class differ");
    }
}
