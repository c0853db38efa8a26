//! What the router does to a request before any worker sees it: decode and resample every audio, cut it
//! into 30 s windows, render the chat template and tokenize. Bad input is refused here, before a decoder
//! or encoder is involved.

use std::sync::Arc;
use std::time::Instant;

use afnext_audio::{Overflow, WindowSpec};
use afnext_engine::{AudioKey, EngineError, GenerateRequest};
use afnext_prompt::{AudioSource, PromptProcessor};
use afnext_server::cluster_pb as cpb;
use afnext_server::pb;

/// One audio's samples and the windows that yield tokens.
#[derive(Debug, Clone)]
pub struct RoutedAudio {
    pub samples: Arc<Vec<f32>>,
    pub windows: Vec<WindowSpec>,
}

#[derive(Debug, Clone)]
pub struct Prepared {
    pub submit: cpb::SubmitRequest,
    pub audios: Vec<RoutedAudio>,
}

pub fn prepare(
    proc: &PromptProcessor,
    req: GenerateRequest,
    sampling: pb::SamplingParams,
) -> Result<Prepared, EngineError> {
    let t0 = Instant::now();
    let conv = &req.conversation;
    conv.validate()?;
    let overflow = if req.truncate_audio {
        Overflow::Truncate
    } else {
        Overflow::Reject
    };
    let sr = proc.config().frontend.sampling_rate;
    let mut audios = Vec::new();
    let mut remote = Vec::new();
    let mut counts = Vec::new();
    for (i, src) in conv.audios().into_iter().enumerate() {
        let AudioSource::Bytes { data, .. } = src else {
            return Err(EngineError::InvalidRequest(format!(
                "audio {i}: only audio bytes can be routed"
            )));
        };
        let location = afnext_prompt::prepare::describe(i, src);
        let a = afnext_prompt::prepare::prepare_audio(proc, src, overflow, &location)?;
        counts.push(a.plan.total_tokens());
        remote.push(cpb::RemoteAudio {
            key: AudioKey::of(data, req.truncate_audio).0.to_vec(),
            window_tokens: a.plan.windows.iter().map(|w| w.tokens as u32).collect(),
            seconds: a.duration_s(sr),
        });
        audios.push(RoutedAudio {
            windows: a
                .plan
                .windows
                .iter()
                .filter(|w| w.tokens > 0)
                .copied()
                .collect(),
            samples: Arc::new(a.samples),
        });
    }
    let prompt = proc.encode(conv, &counts)?;
    Ok(Prepared {
        submit: cpb::SubmitRequest {
            prompt_ids: prompt.input_ids,
            audios: remote,
            max_new_tokens: req.max_new_tokens.map(|n| n as u32),
            sampling: Some(sampling),
            stop: req.stop,
            ignore_eos: req.ignore_eos,
            prepare_us: t0.elapsed().as_micros() as u64,
        },
        audios,
    })
}
