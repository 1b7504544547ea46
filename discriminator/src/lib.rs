//! The discriminator service: D is the student architecture with a scalar head
//! (`ril_model::Vlm` with `Head::Scalar`, initialised by `Vlm::discriminator_from_student`),
//! trained online GAIL-style to tell student answers from teacher answers; it scores responses
//! (similarity reward) together with the judge (answer reward).
//!
//! Status: placeholder crate; the service arrives with the services issue. The scalar head, its
//! scoring (`ril_model::score::scalar_scores`) and its gradients exist and are tested in `model`.
//! The answer reward's client, `judge` (an OpenAI-compatible LLM judge), is in place.

pub mod judge;
