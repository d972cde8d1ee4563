//! Flotilla: pm2 for fleets, on NATS.
//!
//! Roles: [`agent`] (one per host), the controller and the CLI ([`cli`]); without a NATS URL the
//! CLI uses the local [`stack`]. They talk only over
//! NATS, through the wire types of [`protocol`], configured by [`config`], connected by [`bus`].

pub mod agent;
pub mod bus;
pub mod cli;
pub mod config;
pub mod controller;
pub mod protocol;
pub mod stack;
pub mod which;
