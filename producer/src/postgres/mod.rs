//! The PostgreSQL change source (in progress): the pgoutput decoder so far.

pub mod pgoutput;

#[cfg(test)]
mod tests;
