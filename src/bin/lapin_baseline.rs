//! The bench's raw Rust baseline: the same scenarios as the PHP clients (benches/clients),
//! with lapin used directly and nothing else, so that `make bench` can say what the PHP layer
//! of amqp_rs costs on top of lapin.
//!
//!   lapin_baseline publish P1|P2|P3 COUNT SIZE QUEUE
//!   lapin_baseline consume C1|C2 COUNT QUEUE
//!   lapin_baseline rpc R1 COUNT SIZE QUEUE
//!   lapin_baseline roundtrip RT COUNT QUEUE    (passive declares, one after another)
//!   lapin_baseline connect CC COUNT            (connect and close, one after another)
//!
//! Prints one JSON line, like the PHP clients: elapsed seconds, client CPU µs (every thread).

use futures_core::Stream;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use std::pin::Pin;
use std::time::Instant;

const URI: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

type Failure = Box<dyn std::error::Error>;

/// User + system CPU time of the whole process, µs.
fn cpu_us() -> f64 {
    // SAFETY: getrusage fills the struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let us = |t: libc::timeval| t.tv_sec as f64 * 1e6 + t.tv_usec as f64;
    us(usage.ru_utime) + us(usage.ru_stime)
}

async fn next<S: Stream + Unpin>(stream: &mut S) -> Option<S::Item> {
    std::future::poll_fn(|cx| Pin::new(&mut *stream).poll_next(cx)).await
}

fn arg(args: &[String], i: usize) -> Result<&str, Failure> {
    args.get(i)
        .map(String::as_str)
        .ok_or_else(|| format!("missing argument {i}; see the file's header").into())
}

async fn publish(scenario: &str, count: usize, size: usize, queue: &str) -> Result<(), Failure> {
    let conn = Connection::connect(URI, ConnectionProperties::default()).await?;
    let channel = conn.create_channel().await?;
    let confirms = scenario != "P1";
    if confirms {
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
    }
    let body = vec![b'x'; size];
    let properties = BasicProperties::default().with_delivery_mode(2);
    let (start, cpu) = (Instant::now(), cpu_us());
    let mut pending = Vec::with_capacity(if scenario == "P2" { count } else { 0 });
    for _ in 0..count {
        let confirm = channel
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                &body,
                properties.clone(),
            )
            .await?;
        if scenario == "P3" {
            confirm.await?;
        } else if confirms {
            pending.push(confirm);
        }
    }
    for confirm in pending {
        confirm.await?;
    }
    let (elapsed, cpu) = (start.elapsed().as_secs_f64(), cpu_us() - cpu);
    conn.close(200, "bye".into()).await?;
    println!("{{\"elapsed\":{elapsed},\"cpu_us\":{cpu}}}");
    Ok(())
}

async fn consume(scenario: &str, count: usize, queue: &str) -> Result<(), Failure> {
    let conn = Connection::connect(URI, ConnectionProperties::default()).await?;
    let channel = conn.create_channel().await?;
    let auto_ack = scenario == "C2";
    let (start, cpu) = (Instant::now(), cpu_us());
    channel.basic_qos(500, BasicQosOptions::default()).await?;
    let options = BasicConsumeOptions {
        no_ack: auto_ack,
        ..BasicConsumeOptions::default()
    };
    let mut deliveries = channel
        .basic_consume(queue.into(), "".into(), options, FieldTable::default())
        .await?;
    let mut handled = 0;
    while handled < count {
        let Some(delivery) = next(&mut deliveries).await else {
            break;
        };
        let delivery = delivery?;
        if !auto_ack {
            delivery.ack(BasicAckOptions::default()).await?;
        }
        handled += 1;
    }
    let (elapsed, cpu) = (start.elapsed().as_secs_f64(), cpu_us() - cpu);
    conn.close(200, "bye".into()).await?;
    println!("{{\"elapsed\":{elapsed},\"cpu_us\":{cpu},\"handled\":{handled},\"seen\":{handled}}}");
    Ok(())
}

async fn rpc(count: usize, size: usize, queue: &str) -> Result<(), Failure> {
    let conn = Connection::connect(URI, ConnectionProperties::default()).await?;
    let channel = conn.create_channel().await?;
    let options = BasicConsumeOptions {
        no_ack: true,
        ..BasicConsumeOptions::default()
    };
    let mut replies = channel
        .basic_consume(
            "amq.rabbitmq.reply-to".into(),
            "".into(),
            options,
            FieldTable::default(),
        )
        .await?;
    let body = vec![b'x'; size];
    let warm_up = 200;
    let mut latencies = Vec::with_capacity(count);
    let (mut start, mut cpu) = (Instant::now(), cpu_us());
    for i in 0..warm_up + count {
        if i == warm_up {
            (start, cpu) = (Instant::now(), cpu_us());
        }
        let sent = Instant::now();
        let id = format!("{i}");
        let properties = BasicProperties::default()
            .with_reply_to("amq.rabbitmq.reply-to".into())
            .with_correlation_id(id.as_str().into());
        channel
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                &body,
                properties,
            )
            .await?;
        loop {
            let reply = next(&mut replies).await.ok_or("reply consumer ended")??;
            if reply
                .properties
                .correlation_id()
                .as_ref()
                .map(|c| c.as_str())
                == Some(&id)
            {
                break;
            }
        }
        if i >= warm_up {
            latencies.push(sent.elapsed().as_secs_f64() * 1e6);
        }
    }
    let (elapsed, cpu) = (start.elapsed().as_secs_f64(), cpu_us() - cpu);
    conn.close(200, "bye".into()).await?;
    latencies.sort_by(f64::total_cmp);
    let pct = |p: f64| latencies[((p * count as f64).ceil() as usize).clamp(1, count) - 1];
    let mean = latencies.iter().sum::<f64>() / count as f64;
    println!(
        "{{\"elapsed\":{elapsed},\"cpu_us\":{cpu},\"timed\":{count},\"calls\":{},\"p50_us\":{},\"p99_us\":{},\"max_us\":{},\"mean_us\":{mean}}}",
        count + warm_up,
        pct(0.50),
        pct(0.99),
        latencies[count - 1]
    );
    Ok(())
}

/// COUNT passive declares of QUEUE one after another: the round trip of `queueStatus()`.
async fn roundtrip(count: usize, queue: &str) -> Result<(), Failure> {
    let conn = Connection::connect(URI, ConnectionProperties::default()).await?;
    let channel = conn.create_channel().await?;
    let options = lapin::options::QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let (start, cpu) = (Instant::now(), cpu_us());
    for _ in 0..count {
        channel
            .queue_declare(queue.into(), options, FieldTable::default())
            .await?;
    }
    let (elapsed, cpu) = (start.elapsed().as_secs_f64(), cpu_us() - cpu);
    conn.close(200, "bye".into()).await?;
    println!("{{\"elapsed\":{elapsed},\"cpu_us\":{cpu}}}");
    Ok(())
}

/// COUNT connections opened and closed one after another.
async fn connect_close(count: usize) -> Result<(), Failure> {
    let (start, cpu) = (Instant::now(), cpu_us());
    for _ in 0..count {
        let conn = Connection::connect(URI, ConnectionProperties::default()).await?;
        conn.close(200, "bye".into()).await?;
    }
    let (elapsed, cpu) = (start.elapsed().as_secs_f64(), cpu_us() - cpu);
    println!("{{\"elapsed\":{elapsed},\"cpu_us\":{cpu}}}");
    Ok(())
}

fn main() -> Result<(), Failure> {
    let args: Vec<String> = std::env::args().collect();
    let side = arg(&args, 1)?;
    let scenario = arg(&args, 2)?;
    let count: usize = arg(&args, 3)?.parse()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    match side {
        "publish" => {
            let size: usize = arg(&args, 4)?.parse()?;
            runtime.block_on(publish(scenario, count, size, arg(&args, 5)?))
        }
        "consume" => runtime.block_on(consume(scenario, count, arg(&args, 4)?)),
        "rpc" if count > 0 => {
            let size: usize = arg(&args, 4)?.parse()?;
            runtime.block_on(rpc(count, size, arg(&args, 5)?))
        }
        "roundtrip" => runtime.block_on(roundtrip(count, arg(&args, 4)?)),
        "connect" => runtime.block_on(connect_close(count)),
        _ => Err(format!("unknown side '{side}' (publish, consume, rpc or roundtrip)").into()),
    }
}
