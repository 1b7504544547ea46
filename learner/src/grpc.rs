//! The thin gRPC adapter: `ril.v1.Learner` (actors: PushGroups, GetWeights, Info) and
//! `ril.v1.LearnerRanks` (rank 0: TrainShard) over [`LearnerService`]. Each handler converts
//! the request ([`crate::convert`]), calls the service and maps its error through
//! `ril_proto::error::status`; every decision is the service's.

use std::pin::Pin;
use std::sync::{Arc, OnceLock};

use futures_util::Stream;
use ril_proto::error::status;
use ril_proto::v1 as pb;
use ril_proto::v1::learner_ranks_server::LearnerRanks;
use ril_proto::v1::learner_server::Learner;
use tonic::{Request, Response as GrpcResponse, Status};

use crate::convert::weight_chunks;
use crate::error::LearnerError;
use crate::service::{CoordinatorLink, IncomingGroup, LearnerService};

/// `ril.v1.Learner` and `ril.v1.LearnerRanks` over the domain service, which is set once the
/// model is loaded and the ranks have met (until then every call is UNAVAILABLE).
#[derive(Debug, Clone)]
pub struct LearnerGrpc<C: CoordinatorLink> {
    service: Arc<OnceLock<LearnerService<C>>>,
}

impl<C: CoordinatorLink> LearnerGrpc<C> {
    pub fn new(service: Arc<OnceLock<LearnerService<C>>>) -> Self {
        Self { service }
    }

    fn ready(&self) -> Result<&LearnerService<C>, Status> {
        self.service.get().ok_or_else(|| {
            status(&LearnerError::NotReady(
                "loading the model or waiting for the coordinator".into(),
            ))
        })
    }
}

type ChunkStream = Pin<Box<dyn Stream<Item = Result<pb::WeightChunk, Status>> + Send>>;

#[tonic::async_trait]
impl<C: CoordinatorLink> Learner for LearnerGrpc<C> {
    #[tracing::instrument(skip(self, request), fields(groups))]
    async fn push_groups(
        &self,
        request: Request<pb::PushGroupsRequest>,
    ) -> Result<GrpcResponse<pb::PushGroupsResponse>, Status> {
        let service = self.ready()?;
        let groups = request.into_inner().groups;
        tracing::Span::current().record("groups", groups.len());
        let groups = groups.iter().map(IncomingGroup::try_from).collect();
        let verdicts = service.push_groups(groups).await.map_err(|e| status(&e))?;
        Ok(GrpcResponse::new(pb::PushGroupsResponse {
            verdicts: verdicts.into_iter().map(pb::GroupVerdict::from).collect(),
            policy_version: service.current_version(),
        }))
    }

    type GetWeightsStream = ChunkStream;

    #[tracing::instrument(skip(self, request))]
    async fn get_weights(
        &self,
        request: Request<pb::GetWeightsRequest>,
    ) -> Result<GrpcResponse<Self::GetWeightsStream>, Status> {
        let service = self.ready()?;
        let req = request.into_inner();
        let payload = service.weights(req.version).map_err(|e| status(&e))?;
        service.weights_served(payload.bytes.len());
        let chunks = weight_chunks(payload, req.chunk_bytes).map(Ok);
        Ok(GrpcResponse::new(
            Box::pin(futures_util::stream::iter(chunks)) as ChunkStream,
        ))
    }

    #[tracing::instrument(skip(self, _request))]
    async fn info(
        &self,
        _request: Request<pb::LearnerInfoRequest>,
    ) -> Result<GrpcResponse<pb::LearnerInfo>, Status> {
        let info = self.ready()?.info().map_err(|e| status(&e))?;
        Ok(GrpcResponse::new(pb::LearnerInfo::from(info)))
    }
}

#[tonic::async_trait]
impl<C: CoordinatorLink> LearnerRanks for LearnerGrpc<C> {
    #[tracing::instrument(skip(self, request), fields(iteration, groups))]
    async fn train_shard(
        &self,
        request: Request<pb::TrainShardRequest>,
    ) -> Result<GrpcResponse<pb::TrainShardResponse>, Status> {
        let service = self.ready()?;
        let req = request.into_inner();
        tracing::Span::current().record("iteration", req.iteration);
        tracing::Span::current().record("groups", req.groups.len());
        let shard = req
            .groups
            .iter()
            .map(IncomingGroup::try_from)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|r| status(&LearnerError::MalformedShard(r)))?;
        let policy_version = service
            .train_shard(req.iteration, shard)
            .await
            .map_err(|e| status(&e))?;
        Ok(GrpcResponse::new(pb::TrainShardResponse { policy_version }))
    }
}
