//! `ril bench rpc`: what the wire costs per scored group, apart from any model work. A realistic
//! `ScoredGroup` (the question with its PNG, 2G responses of N tokens with log-probs) is
//! encoded/decoded with prost, and pushed over a real loopback gRPC connection to a learner
//! stand-in that only decodes and answers, so the time is serialisation + HTTP/2 + TCP.

use std::time::{Duration, Instant};

use ril_proto::v1;
use ril_proto::v1::learner_server::{Learner, LearnerServer};
use tonic::{Request, Response, Status};

#[derive(Debug, clap::Args)]
pub struct RpcBenchArgs {
    /// Student rollouts per group (the group holds 2G responses).
    #[arg(long, default_value_t = 4)]
    pub group_size: usize,
    /// Tokens per response.
    #[arg(long, default_value_t = 48)]
    pub tokens: usize,
    /// Side of the question's PNG in pixels.
    #[arg(long, default_value_t = 72)]
    pub image_size: u32,
    /// Timed calls (after 20 warm-up calls).
    #[arg(long, default_value_t = 500)]
    pub calls: usize,
}

struct Stub;

type Chunks =
    std::pin::Pin<Box<dyn futures_util::Stream<Item = Result<v1::WeightChunk, Status>> + Send>>;

#[tonic::async_trait]
impl Learner for Stub {
    async fn push_groups(
        &self,
        r: Request<v1::PushGroupsRequest>,
    ) -> Result<Response<v1::PushGroupsResponse>, Status> {
        let verdicts = r
            .into_inner()
            .groups
            .iter()
            .map(|g| v1::GroupVerdict {
                position: g.position,
                accepted: true,
                reason: String::new(),
            })
            .collect();
        Ok(Response::new(v1::PushGroupsResponse {
            verdicts,
            policy_version: 0,
        }))
    }
    type GetWeightsStream = Chunks;
    async fn get_weights(
        &self,
        _: Request<v1::GetWeightsRequest>,
    ) -> Result<Response<Chunks>, Status> {
        Err(Status::unimplemented("bench stub"))
    }
    async fn info(
        &self,
        _: Request<v1::LearnerInfoRequest>,
    ) -> Result<Response<v1::LearnerInfo>, Status> {
        Err(Status::unimplemented("bench stub"))
    }
}

fn group(args: &RpcBenchArgs) -> anyhow::Result<v1::ScoredGroup> {
    // A real PNG of noise (incompressible, like a photo's worst case).
    let mut img = image::RgbImage::new(args.image_size, args.image_size);
    let mut x: u32 = 12345;
    for p in img.pixels_mut() {
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
        *p = image::Rgb([(x >> 16) as u8, (x >> 8) as u8, x as u8]);
    }
    let mut png = Vec::new();
    image::DynamicImage::ImageRgb8(img)
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)?;
    let response = |i: usize, student: bool| v1::ScoredResponse {
        source: if student {
            v1::ResponseSource::Student as i32
        } else {
            v1::ResponseSource::Teacher as i32
        },
        teacher: if student { String::new() } else { "t".into() },
        text: "x".repeat(args.tokens * 3),
        token_ids: (0..args.tokens as u32).map(|t| t * 7 + i as u32).collect(),
        behaviour_logprobs: if student {
            (0..args.tokens).map(|t| -(t as f32) / 10.0).collect()
        } else {
            Vec::new()
        },
        policy_version: 3,
        d_prob: 0.4,
        r_sim: 1.0,
        r_ans: 0.0,
        truncated: false,
    };
    Ok(v1::ScoredGroup {
        lease_id: "lease-1".into(),
        position: 7,
        iteration: 1,
        question: Some(v1::Question {
            id: "q-7".into(),
            messages: vec![v1::ChatMessage {
                role: "user".into(),
                text: "What colour is the circle?".into(),
                parts_json: String::new(),
            }],
            images: vec![v1::Image {
                name: "q-7.png".into(),
                data: png.into(),
            }],
            reference: "red".into(),
            answer_type: "exact".into(),
            family: "colour".into(),
        }),
        prompt_token_ids: (0..100).collect(),
        responses: (0..args.group_size)
            .map(|i| response(i, true))
            .chain((0..args.group_size).map(|i| response(i, false)))
            .collect(),
        actor_id: "actor-0".into(),
        timings_ms: Default::default(),
    })
}

pub fn run(args: &RpcBenchArgs) -> anyhow::Result<()> {
    use prost::Message;
    let g = group(args)?;
    let bytes = g.encode_to_vec();
    let n = args.calls.max(1);
    let t = Instant::now();
    for _ in 0..n {
        let b = std::hint::black_box(&g).encode_to_vec();
        let d = v1::ScoredGroup::decode(b.as_slice())?;
        std::hint::black_box(d);
    }
    let codec = t.elapsed().as_secs_f64() / n as f64;
    let rt = ril_orchestrate::runtime()?;
    let rpc = rt.block_on(async {
        let bound = ril_proto::server::bind("127.0.0.1:0").await?;
        let addr = bound.addr.to_string();
        tokio::spawn(
            ril_proto::server::builder()
                .add_service(LearnerServer::new(Stub))
                .serve_with_incoming(ril_proto::server::incoming(bound)),
        );
        let ch =
            ril_proto::client::connect(&addr, Duration::from_secs(5), &Default::default()).await?;
        let mut c = v1::learner_client::LearnerClient::new(ch);
        let req = v1::PushGroupsRequest {
            groups: vec![g.clone()],
        };
        for _ in 0..20 {
            c.push_groups(req.clone()).await?;
        }
        let t = Instant::now();
        for _ in 0..n {
            c.push_groups(req.clone()).await?;
        }
        Ok::<_, anyhow::Error>(t.elapsed().as_secs_f64() / n as f64)
    })?;
    println!("| what | value |\n|---|---:|");
    println!(
        "| group: 2G responses x tokens | {} x {} |",
        2 * args.group_size,
        args.tokens
    );
    println!("| encoded ScoredGroup | {} bytes |", bytes.len());
    println!("| prost encode + decode | {:.1} µs |", codec * 1e6);
    println!(
        "| PushGroups round trip on loopback (encode, HTTP/2, decode, reply) | {:.1} µs |",
        rpc * 1e6
    );
    Ok(())
}
