//! Time to the complete answer of a search: what a user of `sluice query --all` waits for.
//! Each answer follows the page tokens until `limit` events are in hand or no token is left,
//! and the report gives the answer's time and calls beside the per-call percentiles.

use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tonic::transport::Channel;

use super::BenchError;
use sluice::proto::{QueryRequest, query_service_client::QueryServiceClient};

/// One search shape: its name and its first request.
pub struct Shape {
    pub name: &'static str,
    pub request: QueryRequest,
}

/// What the answers of one shape took.
struct Answers {
    /// Per answer, in µs.
    answer: Histogram<u64>,
    /// Per call, in µs.
    call: Histogram<u64>,
    calls: Vec<usize>,
    found: Vec<usize>,
    /// Answers cut at `max_calls` with a token still to follow.
    unfinished: usize,
}

/// Times `iterations` complete answers of each shape, at most `max_calls` calls each.
pub async fn run(
    client: &mut QueryServiceClient<Channel>,
    shapes: Vec<Shape>,
    iterations: usize,
    max_calls: usize,
) -> Result<(), BenchError> {
    println!(
        "complete answers ({iterations} per shape, pages followed until `limit` events or no token):"
    );
    for shape in shapes {
        let mut answers = Answers {
            answer: Histogram::new_with_bounds(1, 3_600_000_000, 3)?,
            call: Histogram::new_with_bounds(1, 3_600_000_000, 3)?,
            calls: Vec::new(),
            found: Vec::new(),
            unfinished: 0,
        };
        for _ in 0..iterations {
            answer(client, &shape.request, max_calls, &mut answers).await?;
        }
        report(shape.name, &answers);
    }
    Ok(())
}

async fn answer(
    client: &mut QueryServiceClient<Channel>,
    first: &QueryRequest,
    max_calls: usize,
    answers: &mut Answers,
) -> Result<(), BenchError> {
    let wanted = first.limit.max(1) as usize;
    let mut request = first.clone();
    let mut found = 0;
    let mut calls = 0;
    let started = Instant::now();
    loop {
        let call = Instant::now();
        let page = client.query(request.clone()).await?.into_inner();
        answers.call.saturating_record(micros(call.elapsed()));
        calls += 1;
        found += page.events.len();
        if found >= wanted || page.next_page_token.is_empty() {
            break;
        }
        if calls >= max_calls {
            answers.unfinished += 1;
            break;
        }
        request.limit = (wanted - found) as u32;
        request.page_token = page.next_page_token;
    }
    answers.answer.saturating_record(micros(started.elapsed()));
    answers.calls.push(calls);
    answers.found.push(found);
    Ok(())
}

fn micros(elapsed: Duration) -> u64 {
    (elapsed.as_micros() as u64).max(1)
}

fn report(name: &str, answers: &Answers) {
    let at = |histogram: &Histogram<u64>, quantile: f64| {
        Duration::from_micros(histogram.value_at_quantile(quantile))
    };
    let mean_calls = answers.calls.iter().sum::<usize>() as f64 / answers.calls.len().max(1) as f64;
    let max_calls = answers.calls.iter().max().copied().unwrap_or(0);
    let found = answers.found.iter().max().copied().unwrap_or(0);
    println!(
        "{name:<28} answer p50 {:>10?} p99 {:>10?} max {:>10?} | calls mean {mean_calls:.1} max {max_calls} | per call p50 {:>9?} p99 {:>9?} max {:>9?} | found {found}{}",
        at(&answers.answer, 0.5),
        at(&answers.answer, 0.99),
        Duration::from_micros(answers.answer.max()),
        at(&answers.call, 0.5),
        at(&answers.call, 0.99),
        Duration::from_micros(answers.call.max()),
        if answers.unfinished > 0 {
            format!(" ({} answers cut at the call limit)", answers.unfinished)
        } else {
            String::new()
        }
    );
}
