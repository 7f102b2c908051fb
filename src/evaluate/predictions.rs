//! Each test picture's prediction and logits, written as CSV (`evaluate --predictions`).

use std::path::Path;

use crate::error::{Error, Result};

/// What the model said about each image of an evaluated set, in the set's order.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageOutputs {
    pub classes: usize,
    /// Row-major `[images, classes]`, as f32 (test-time augmented ones with `tta`).
    pub logits: Vec<f32>,
    /// Each image's class of the highest logit: the one its confusion-matrix cell counts.
    pub predicted: Vec<u32>,
}

impl ImageOutputs {
    /// None yet, of a model with `classes` outputs.
    pub fn new(classes: usize) -> Self {
        Self {
            classes,
            logits: Vec::new(),
            predicted: Vec::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.predicted.len()
    }

    pub fn is_empty(&self) -> bool {
        self.predicted.is_empty()
    }

    /// Image `i`'s logits.
    pub fn logits(&self, i: usize) -> &[f32] {
        &self.logits[i * self.classes..(i + 1) * self.classes]
    }
}

/// Writes `outputs` as CSV, atomically: a header, then one row per image in the set's order,
/// `index,path,label,predicted,logit_0,..,logit_{K-1}`. `files` names each image's file (a
/// folder's); without it the path column is empty. Logits are printed so that they read back
/// to the same f32.
pub fn write_predictions(
    path: &Path,
    outputs: &ImageOutputs,
    labels: &[u32],
    files: Option<&[std::path::PathBuf]>,
) -> Result<()> {
    use std::io::Write;
    if labels.len() != outputs.len() || files.is_some_and(|f| f.len() != outputs.len()) {
        return Err(Error::InvalidSetting(format!(
            "{} predictions for {} labels and {} files",
            outputs.len(),
            labels.len(),
            files.map_or(0, <[_]>::len)
        )));
    }
    crate::fs::write_atomic_with(path, |out| {
        write!(out, "index,path,label,predicted")?;
        for k in 0..outputs.classes {
            write!(out, ",logit_{k}")?;
        }
        writeln!(out)?;
        for (i, (&label, &predicted)) in labels.iter().zip(&outputs.predicted).enumerate() {
            let file = files.map(|f| f[i].to_string_lossy()).unwrap_or_default();
            write!(out, "{i},{},{label},{predicted}", csv_field(&file))?;
            for logit in outputs.logits(i) {
                // Display prints the shortest digits that read back as the same f32.
                write!(out, ",{logit}")?;
            }
            writeln!(out)?;
        }
        Ok(())
    })
}

/// `text` as one CSV field: quoted (quotes doubled) where a comma, quote or line break in it
/// would otherwise split the row.
fn csv_field(text: &str) -> std::borrow::Cow<'_, str> {
    if text.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", text.replace('"', "\"\"")).into()
    } else {
        text.into()
    }
}
