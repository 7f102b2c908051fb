//! How a 4-D activation's axes lie in memory. Channels first, [N, C, H, W], is PyTorch's
//! default and what kiln's CPU kernels read; channels last, [N, H, W, C] (PyTorch's
//! `torch.channels_last`), is what cuDNN's tensor-core convolutions read and write without
//! transposing, so kiln's CUDA models use it. A channels-last tensor here is a contiguous
//! [N, H, W, C] tensor: its shape says its layout, and every candle operation on it is exact.

use candle_core::{Device, Tensor};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum MemoryFormat {
    /// [N, C, H, W]
    #[default]
    ChannelsFirst,
    /// [N, H, W, C]
    ChannelsLast,
}

impl MemoryFormat {
    /// The fastest format for convolutional networks on `device`: channels last where cuDNN
    /// runs the convolutions (the `cudnn` feature on CUDA), channels first elsewhere.
    pub fn preferred(device: &Device) -> Self {
        if device.is_cuda() && cfg!(feature = "cudnn") {
            Self::ChannelsLast
        } else {
            Self::ChannelsFirst
        }
    }

    /// The channel axis of a 4-D activation.
    pub fn channel_dim(self) -> usize {
        match self {
            Self::ChannelsFirst => 1,
            Self::ChannelsLast => 3,
        }
    }

    /// The image plane's two axes (height, width).
    pub fn plane_dims(self) -> (usize, usize) {
        match self {
            Self::ChannelsFirst => (2, 3),
            Self::ChannelsLast => (1, 2),
        }
    }

    /// A per-channel vector's shape for broadcasting over a 4-D activation.
    pub fn per_channel(self, channels: usize) -> (usize, usize, usize, usize) {
        match self {
            Self::ChannelsFirst => (1, channels, 1, 1),
            Self::ChannelsLast => (1, 1, 1, channels),
        }
    }

    /// `x` [N, C, H, W] in this format (contiguous).
    pub fn from_nchw(self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::ChannelsFirst => Ok(x.clone()),
            Self::ChannelsLast => x.permute((0, 2, 3, 1))?.contiguous(),
        }
    }

    /// `x`, in this format, as [N, C, H, W] (contiguous).
    pub fn to_nchw(self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::ChannelsFirst => Ok(x.clone()),
            Self::ChannelsLast => x.permute((0, 3, 1, 2))?.contiguous(),
        }
    }

    /// `(n, c, h, w)` of a 4-D activation in this format.
    pub fn nchw_dims(self, x: &Tensor) -> candle_core::Result<Dims4> {
        Ok(self.to_nchw_order(x.dims4()?))
    }

    /// The dimensions of a 4-D tensor in this format, in (n, c, h, w) order; weights
    /// ([CO, C, KH, KW], or [CO, KH, KW, C] channels last) permute alike.
    pub fn to_nchw_order(self, (a, b, c, d): Dims4) -> Dims4 {
        match self {
            Self::ChannelsFirst => (a, b, c, d),
            Self::ChannelsLast => (a, d, b, c),
        }
    }

    /// The inverse: a tensor's dimensions in this format from (n, c, h, w).
    pub fn from_nchw_order(self, (n, c, h, w): Dims4) -> Dims4 {
        match self {
            Self::ChannelsFirst => (n, c, h, w),
            Self::ChannelsLast => (n, h, w, c),
        }
    }
}

/// Four dimensions of a 4-D tensor.
pub type Dims4 = (usize, usize, usize, usize);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channels_last_round_trips_and_names_its_axes() {
        let x = Tensor::arange(0f32, 120.0, &Device::Cpu)
            .unwrap()
            .reshape((2, 3, 4, 5))
            .unwrap();
        let last = MemoryFormat::ChannelsLast;
        let nhwc = last.from_nchw(&x).unwrap();
        assert_eq!(nhwc.dims(), [2, 4, 5, 3]);
        assert_eq!(last.nchw_dims(&nhwc).unwrap(), (2, 3, 4, 5));
        assert_eq!(last.from_nchw_order((2, 3, 4, 5)), (2, 4, 5, 3));
        // Element (n=1, c=2, h=3, w=4) sits at [1, 3, 4, 2] channels last.
        let v = |t: &Tensor, i: [usize; 4]| {
            t.get(i[0])
                .and_then(|t| t.get(i[1]))
                .and_then(|t| t.get(i[2]))
                .and_then(|t| t.get(i[3]))
                .and_then(|t| t.to_scalar::<f32>())
                .unwrap()
        };
        assert_eq!(v(&x, [1, 2, 3, 4]), v(&nhwc, [1, 3, 4, 2]));
        let back = last.to_nchw(&nhwc).unwrap();
        assert_eq!(
            back.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            x.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
        assert_eq!(
            MemoryFormat::preferred(&Device::Cpu),
            MemoryFormat::ChannelsFirst
        );
    }
}
