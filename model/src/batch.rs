//! Packing variable-length sequences into padded batches.

use candle_core::{Device, Tensor};

use crate::error::{ModelError, Result};

/// Which end of a sequence padding goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PadSide {
    /// Generation: every prompt ends at the last column, so the next token is read from there.
    Left,
    /// Scoring and training: every sequence starts at column 0.
    Right,
}

/// A padded batch ready for [`crate::vlm::Vlm::forward_hidden`].
#[derive(Debug, Clone)]
pub struct Packed {
    /// `[B, T]` u32.
    pub input_ids: Tensor,
    /// `[B, T]` u32: the position of each token within its own sequence (padding: 0 for right
    /// padding, 1 for left padding as transformers' generate uses).
    pub positions: Tensor,
    /// `[B][T]`: 1 for real tokens, 0 for padding.
    pub key_valid: Vec<Vec<u8>>,
    /// Column where each row's first real token sits.
    pub starts: Vec<usize>,
    pub lengths: Vec<usize>,
    pub width: usize,
}

pub fn pack(seqs: &[&[u32]], pad_id: u32, side: PadSide, device: &Device) -> Result<Packed> {
    if seqs.is_empty() {
        return Err(ModelError::input("empty batch"));
    }
    if let Some(i) = seqs.iter().position(|s| s.is_empty()) {
        return Err(ModelError::input(format!(
            "sequence {i} of the batch is empty"
        )));
    }
    let width = seqs.iter().map(|s| s.len()).max().unwrap_or(0);
    let b = seqs.len();
    let mut ids = Vec::with_capacity(b * width);
    let mut positions = Vec::with_capacity(b * width);
    let mut key_valid = Vec::with_capacity(b);
    let mut starts = Vec::with_capacity(b);
    for s in seqs {
        let pad = width - s.len();
        let mut valid = Vec::with_capacity(width);
        match side {
            PadSide::Left => {
                ids.extend(std::iter::repeat_n(pad_id, pad));
                positions.extend(std::iter::repeat_n(1u32, pad));
                ids.extend_from_slice(s);
                positions.extend(0..s.len() as u32);
                valid.extend(std::iter::repeat_n(0u8, pad));
                valid.extend(std::iter::repeat_n(1u8, s.len()));
                starts.push(pad);
            }
            PadSide::Right => {
                ids.extend_from_slice(s);
                positions.extend(0..s.len() as u32);
                ids.extend(std::iter::repeat_n(pad_id, pad));
                positions.extend(std::iter::repeat_n(0u32, pad));
                valid.extend(std::iter::repeat_n(1u8, s.len()));
                valid.extend(std::iter::repeat_n(0u8, pad));
                starts.push(0);
            }
        }
        key_valid.push(valid);
    }
    Ok(Packed {
        input_ids: Tensor::from_vec(ids, (b, width), device)?,
        positions: Tensor::from_vec(positions, (b, width), device)?,
        key_valid,
        starts,
        lengths: seqs.iter().map(|s| s.len()).collect(),
        width,
    })
}

/// Concatenates the images of several rows (`[n_i, C, H, W]` each, or none) in row order.
pub fn concat_images(images: &[Option<&Tensor>]) -> Result<Option<Tensor>> {
    let present: Vec<&Tensor> = images.iter().filter_map(|i| *i).collect();
    if present.is_empty() {
        return Ok(None);
    }
    Ok(Some(Tensor::cat(&present, 0)?))
}
