//! The thin gRPC adapter: converts `ril.v1` messages (`convert`), calls the domain service,
//! maps errors to status codes through the one table (`ril_proto::error::status`); and
//! [`serve`], which runs it with health, reflection, explicit message limits and graceful
//! shutdown.

use std::future::Future;
use std::sync::{Arc, OnceLock};

use candle_core::Device;
use ril_proto::error::status;
use ril_proto::server::{
    Bound, ServeError, ServingStatus, health, incoming, names, reflection, set_status,
};
use ril_proto::v1;
use ril_proto::v1::discriminator_server::{Discriminator, DiscriminatorServer};
use tonic::{Request, Response, Status};
use tracing::{info, instrument, warn};

use crate::answer_judge::AnswerJudge;
use crate::convert::{ScoreQuery, TrainBatch};
use crate::error::{DiscriminatorError, Result};
use crate::options::DiscriminatorOptions;
use crate::service::{DiscriminatorService, wait_for_judge};

/// The gRPC face of [`DiscriminatorService`]. Until the service is set (model loaded, judge
/// answering) every call is UNAVAILABLE.
#[derive(Debug, Clone, Default)]
pub struct DiscriminatorGrpc {
    service: Arc<OnceLock<Arc<DiscriminatorService>>>,
}

impl DiscriminatorGrpc {
    pub fn new(service: Arc<DiscriminatorService>) -> Self {
        let slot = OnceLock::new();
        let _ = slot.set(service);
        Self {
            service: Arc::new(slot),
        }
    }

    fn service(&self) -> Result<&Arc<DiscriminatorService>, Status> {
        self.service.get().ok_or_else(|| {
            status(&DiscriminatorError::NotReady(
                "loading the model or waiting for the judge",
            ))
        })
    }
}

#[tonic::async_trait]
impl Discriminator for DiscriminatorGrpc {
    #[instrument(skip(self, request))]
    async fn score(
        &self,
        request: Request<v1::ScoreRequest>,
    ) -> Result<Response<v1::ScoreResponse>, Status> {
        let service = self.service()?;
        let query = ScoreQuery::try_from(request.into_inner()).map_err(|e| status(&e))?;
        let outcome = service
            .score(query.question, query.responses)
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(outcome.into()))
    }

    #[instrument(skip(self, request))]
    async fn train(
        &self,
        request: Request<v1::TrainRequest>,
    ) -> Result<Response<v1::TrainResponse>, Status> {
        let service = self.service()?;
        let batch = TrainBatch::try_from(request.into_inner()).map_err(|e| status(&e))?;
        let outcome = service
            .train(batch.iteration, batch.items)
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(outcome.into()))
    }

    #[instrument(skip(self, request))]
    async fn info(
        &self,
        request: Request<v1::DiscriminatorInfoRequest>,
    ) -> Result<Response<v1::DiscriminatorInfo>, Status> {
        let v1::DiscriminatorInfoRequest {} = request.into_inner();
        Ok(Response::new(self.service()?.info().into()))
    }
}

/// Runs the discriminator service on `bound` until `shutdown` resolves.
///
/// Health (`ril.v1.Discriminator` and the server as a whole) is NOT_SERVING while D loads and
/// (for the LLM judge) until the judge has answered a probe, then SERVING; NOT_SERVING again
/// once shutdown begins. Reflection is served. On shutdown the server stops taking calls,
/// finishes the ones in flight, and then D is saved to `checkpoint_dir` (unless frozen or
/// already saved at this step). A model that fails to load is the error.
pub async fn serve(
    options: DiscriminatorOptions,
    device: Device,
    bound: Bound,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    options.validate()?;
    let addr = bound.addr;
    let (reporter, health_service) = health([names::DISCRIMINATOR]).await;
    let (reflection_v1, reflection_v1alpha) = reflection(&[names::DISCRIMINATOR])?;
    let adapter = DiscriminatorGrpc::default();
    let slot = adapter.service.clone();
    {
        let slot = slot.clone();
        bound.metrics.add_loaded(
            "ril_discriminator_loaded",
            "1 once D is loaded and the discriminator serves.",
            move || slot.get().cloned(),
            |service, out| service.write_metrics(out),
        );
    }
    let limit = options.max_message_bytes;
    let discriminator = DiscriminatorServer::new(adapter)
        .max_decoding_message_size(limit)
        .max_encoding_message_size(limit);

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let draining = reporter.clone();
    let stop = async move {
        tokio::select! {
            _ = shutdown => {}
            _ = stop_rx => {}
        }
        info!("discriminator shutting down");
        set_status(
            &draining,
            &[names::DISCRIMINATOR],
            ServingStatus::NotServing,
        )
        .await;
    };
    let server = bound
        .server(&health_service)
        .await?
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(discriminator)
        .serve_with_incoming_shutdown(incoming(bound), stop);
    let mut server = std::pin::pin!(server);
    let serve_error = |source| DiscriminatorError::Serve(ServeError::Serve { addr, source });
    let device_name = ril_model::device::describe(&device);
    info!(%addr, judge = %options.judge_name(), device = %device_name, "discriminator listening; loading D");

    let startup = async {
        let judge = AnswerJudge::new(&options.judge)?;
        let (service, ()) = tokio::join!(
            DiscriminatorService::load(options.clone(), device),
            wait_for_judge(&judge)
        );
        Ok::<_, DiscriminatorError>(Arc::new(service?))
    };
    let started = tokio::select! {
        served = &mut server => {
            // Shut down before D was ready: nothing to save.
            served.map_err(serve_error)?;
            return Ok(());
        }
        started = startup => started,
    };
    let service = match started {
        Ok(service) => service,
        Err(e) => {
            let _ = stop_tx.send(());
            if let Err(serve_failure) = server.await {
                warn!(error = %serve_failure, "the server failed while stopping");
            }
            return Err(e);
        }
    };
    let _ = slot.set(service.clone());
    set_status(&reporter, &[names::DISCRIMINATOR], ServingStatus::Serving).await;
    info!(%addr, step = service.info().step, "discriminator serving");

    let served = server.await;
    drop(stop_tx);
    let saved = service.save_checkpoint().await;
    served.map_err(serve_error)?;
    if let Some(dir) = saved? {
        info!(dir = %dir.display(), "discriminator saved on shutdown");
    }
    Ok(())
}
