//! changewire end-to-end tests: one binary, real PostgreSQL and a real Kafka-API broker
//! (start them with `scripts/stack up`; `scripts/test` does everything).

mod alert;
mod audit;
mod config;
mod consumer;
mod crash;
mod dedup;
mod effects;
mod forward;
mod gateway;
mod gateway_sources;
mod kube_recovery;
mod kubernetes;
mod large;
mod operability;
mod ownership;
mod pgoutput;
mod pipeline;
mod postgres;
mod rebalance;
mod registry;
mod restart;
mod server_checks;
mod siem;
mod siem_syslog;
mod smoke;
mod sources;
mod tls;
mod types;
