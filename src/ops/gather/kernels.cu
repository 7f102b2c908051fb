// Kernels of src/ops/gather.rs: part of kiln's one PTX module (src/ops/kernels.cu).
#include "../common.cuh"

// ---- data: u8 images gathered by index, scaled to [0,1] and normalised per channel ----------

struct Normalisation {
    float mean[4];
    float std[4];
};

// The random transforms of one batch (ops/gather.rs: `Augmentation`); on = 0: none.
// alternate: 0 a coin per image and batch; 1, 2 a coin per image from flip_key (as
// `AlternateFlip`), turned over when 2.
struct Augment {
    uint64_t key, flip_key;
    uint32_t on, width, crop_padding, reflect, flip, cutout, resized, alternate;
    // Image i of the batch draws as position first + i * stride (`Positions` in ops/gather.rs).
    uint32_t first, stride;
};

// SplitMix64's finaliser, as ops/gather.rs `mix`.
__device__ uint64_t mix(uint64_t z) {
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// Draw k of image i, uniform in [0, n): as `Augmentation::uniform`.
__device__ uint32_t uniform(const Augment& a, uint64_t i, uint64_t k, uint32_t n) {
    i = a.first + i * a.stride;
    uint64_t h = mix(a.key ^ mix((i << 3) | k));
    return (uint32_t)(((h >> 32) * (uint64_t)n) >> 32);
}

// The source index for padded position p along a side of `size`, or -1 for zero padding.
__device__ int source(const Augment& a, int p, int size) {
    int pad = (int)a.crop_padding;
    if (p >= pad && p - pad < size) return p - pad;
    if (!a.reflect) return -1;
    return p < pad ? pad - p : 2 * (size - 1) - (p - pad);
}

// Output position p of `size` samples a crop of `extent` pixels from *first, with the next
// pixel's weight *weight in 1/256 steps: ops/gather.rs `resize_tap`.
__device__ void resize_tap(uint32_t p, uint32_t size, uint32_t extent, uint32_t* first,
                           uint32_t* weight) {
    uint64_t num = (uint64_t)(2 * p + 1) * extent * 256, off = (uint64_t)size * 256;
    uint64_t at = (num > off ? num - off : 0) / (2 * (uint64_t)size);
    *first = (uint32_t)(at / 256);
    *weight = (uint32_t)(at % 256);
    if (*first + 1 >= extent) {
        *first = extent - 1;
        *weight = 0;
    }
}

// out[i, r] = (images[order[i], r'] / 255 - mean[c]) / std[c], c = r / plane, where r' is r
// itself or, augmented, the cropped, flipped pixel (or padding, byte 0), and cutout zeroes a
// square after normalisation: the CPU's formula, operation for operation (division is
// correctly rounded here too), so batches are bit-identical. With a.resized, boxes holds each
// image's resized crop (top, left, height, width), drawn on the host, and the pixel is their
// bilinear blend in integers, as on the CPU.
extern "C" __global__ void gather_normalise(
    const uint8_t* images, const uint32_t* order, uint32_t n, uint32_t image_bytes,
    uint32_t plane, Normalisation norm, Augment a, const uint32_t* boxes, float* out) {
    size_t total = (size_t)n * image_bytes;
    for (size_t idx = blockIdx.x * (size_t)blockDim.x + threadIdx.x; idx < total;
         idx += (size_t)gridDim.x * blockDim.x) {
        size_t i = idx / image_bytes, r = idx % image_bytes;
        uint32_t c = r / plane;
        const uint8_t* image = images + (size_t)order[i] * image_bytes;
        if (!a.on) {
            out[idx] = ((float)image[r] / 255.0f - norm.mean[c]) / norm.std[c];
            continue;
        }
        int w = (int)a.width, h = (int)(plane / a.width);
        int y = (int)((r % plane) / a.width), x = (int)((r % plane) % a.width);
        uint32_t side = 2 * a.crop_padding + 1;
        int dy = (int)uniform(a, i, 0, side), dx = (int)uniform(a, i, 1, side);
        bool flip = a.alternate ? ((mix(a.flip_key ^ (uint64_t)order[i]) >> 63) == 1) != (a.alternate == 2)
                                : (a.flip && uniform(a, i, 2, 2) == 1);
        if (a.cutout) {
            int half = (int)(a.cutout / 2);
            int cy = (int)uniform(a, i, 3, (uint32_t)h), cx = (int)uniform(a, i, 4, (uint32_t)w);
            int y0 = cy > half ? cy - half : 0, y1 = cy + half < h ? cy + half : h;
            int x0 = cx > half ? cx - half : 0, x1 = cx + half < w ? cx + half : w;
            if (y >= y0 && y < y1 && x >= x0 && x < x1) {
                out[idx] = 0.0f;
                continue;
            }
        }
        if (a.resized) {
            const uint32_t* box = boxes + 4 * i;
            uint32_t ry, fy, rx, fx;
            resize_tap((uint32_t)y, (uint32_t)h, box[2], &ry, &fy);
            resize_tap((uint32_t)(flip ? w - 1 - x : x), (uint32_t)w, box[3], &rx, &fx);
            const uint8_t* near = image + c * plane + (box[0] + ry) * w + box[1];
            const uint8_t* far = near + (fy > 0 ? w : 0);
            uint32_t x1 = rx + (fx > 0 ? 1 : 0);
            uint32_t top = near[rx] * (256 - fx) + near[x1] * fx;
            uint32_t bottom = far[rx] * (256 - fx) + far[x1] * fx;
            float value = (float)(top * (256 - fy) + bottom * fy);
            out[idx] = (value / 65536.0f / 255.0f - norm.mean[c]) / norm.std[c];
            continue;
        }
        int sy = source(a, y + dy, h);
        int sx = source(a, (flip ? w - 1 - x : x) + dx, w);
        float byte = (sy < 0 || sx < 0) ? 0.0f : (float)image[c * plane + sy * w + sx];
        out[idx] = (byte / 255.0f - norm.mean[c]) / norm.std[c];
    }
}
