//! The token embedding, kept in its stored (quantized) form and dequantized one row
//! per looked-up token.
//!
//! A dense f32 copy would cost `vocab x hidden x 4` bytes for rows that are read a
//! few at a time: 545 MiB for Qwen2.5-0.5B's 151,936 x 896 table, more than its
//! quantized layers. Each row is dequantized by candle's own block decoder, so the
//! values are bitwise those of the dense copy.

use std::borrow::Cow;

use candle_core::quantized::{QStorage, QTensor};
use candle_core::{Device, Tensor};

use crate::{Error, Result};

/// A `[vocab, hidden]` embedding table as stored blocks.
#[derive(Debug, Clone)]
pub(crate) struct TokenEmbedding {
    dtype: candle_core::quantized::GgmlDType,
    hidden: usize,
    row_bytes: usize,
    data: Vec<u8>,
}

impl TokenEmbedding {
    /// The table of `q` (`[vocab, hidden]`).
    pub(crate) fn new(q: &QTensor) -> Result<Self> {
        let (_, hidden) = q.shape().dims2()?;
        let dtype = q.dtype();
        if hidden % dtype.block_size() != 0 {
            return Err(Error::Tensor {
                name: "token_embd.weight".into(),
                reason: format!(
                    "width {hidden} is not a multiple of the {dtype:?} block of {}",
                    dtype.block_size()
                ),
            });
        }
        Ok(Self {
            dtype,
            hidden,
            row_bytes: hidden / dtype.block_size() * dtype.type_size(),
            data: q.data()?.into_owned(),
        })
    }

    /// The rows of `ids` (each below the vocabulary size), `[ids.len(), hidden]`.
    pub(crate) fn rows(&self, ids: &[u32]) -> Result<Tensor> {
        let mut out = Vec::with_capacity(ids.len() * self.hidden);
        for &id in ids {
            let at = id as usize * self.row_bytes;
            let bytes =
                self.data
                    .get(at..at + self.row_bytes)
                    .ok_or_else(|| Error::TokenOutOfRange {
                        id,
                        vocab_size: self.data.len() / self.row_bytes.max(1),
                    })?;
            let storage = QStorage::from_data(Cow::Borrowed(bytes), &Device::Cpu, self.dtype)?;
            let row = QTensor::new(storage, (1, self.hidden))?.dequantize(&Device::Cpu)?;
            out.extend(row.flatten_all()?.to_vec1::<f32>()?);
        }
        Ok(Tensor::from_vec(
            out,
            (ids.len(), self.hidden),
            &Device::Cpu,
        )?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::GgmlDType;

    /// Rows equal the dense dequantized table's, bitwise, for each stored type.
    #[test]
    fn rows_equal_the_dequantized_table() {
        let w = Tensor::randn(0f32, 1.0, (11, 256), &Device::Cpu).unwrap();
        for dtype in [
            GgmlDType::F32,
            GgmlDType::Q8_0,
            GgmlDType::Q5_0,
            GgmlDType::Q4K,
        ] {
            let q = QTensor::quantize(&w, dtype).unwrap();
            let dense = q.dequantize(&Device::Cpu).unwrap();
            let ids = [3u32, 0, 10, 3];
            let want = dense
                .index_select(&Tensor::new(&ids, &Device::Cpu).unwrap(), 0)
                .unwrap();
            let got = TokenEmbedding::new(&q).unwrap().rows(&ids).unwrap();
            assert_eq!(
                got.to_vec2::<f32>().unwrap(),
                want.to_vec2::<f32>().unwrap(),
                "{dtype:?}"
            );
        }
    }
}
