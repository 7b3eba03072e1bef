//! Every bound the coordinator puts on what it is sent, in one place. A value past a bound is
//! refused (INVALID_ARGUMENT naming the field) before it is stored or acted on; free text that a
//! worker reports about its own failure is cut instead, so the failure is still recorded.
//!
//! The job-spec bounds (model sizes, batch, sequence, steps) are in [`crate::spec`], next to the
//! fields they bound.

use tonic::Status;

/// A job spec's TOML text.
pub const SPEC_BYTES: usize = 1 << 20;
/// Where a spec came from (a file name).
pub const SOURCE_CHARS: usize = 1024;
/// Host names, as DNS allows.
pub const HOSTNAME_CHARS: usize = 253;
/// Device names ("cpu", "cuda:0").
pub const DEVICE_CHARS: usize = 64;
/// A ring address, `host:port`.
pub const ADDRESS_CHARS: usize = 255;
/// A worker's instance id, hex.
pub const INSTANCE_CHARS: std::ops::RangeInclusive<usize> = 32..=128;
/// A checkpoint path.
pub const PATH_CHARS: usize = 4096;
/// A worker's error text (longer ones are cut and marked).
pub const ERROR_CHARS: usize = 4096;
/// Phase-specific values per step report, and the length of each name.
pub const VALUES: usize = 64;
pub const VALUE_NAME_CHARS: usize = 64;
/// A sampled answer a worker returns for a comparison.
pub const ANSWER_CHARS: usize = 16 * 1024;
/// RL samples per step report, the length each prompt and answer is cut to, and how many of a
/// phase's latest steps keep theirs.
pub const SAMPLES: usize = 8;
pub const SAMPLE_CHARS: usize = 2048;
pub const SAMPLE_STEPS: u64 = 100;
/// A labeler's name.
pub const LABELER_CHARS: usize = 128;
/// List pages: the default and the largest page of jobs and of workers.
pub const JOBS_PAGE: (usize, usize) = (100, 500);
pub const WORKERS_PAGE: (usize, usize) = (500, 2000);

/// Refuses `value` when it is longer than `max` characters.
pub fn text(field: &str, value: &str, max: usize) -> Result<(), Status> {
    let n = value.chars().count();
    if n > max {
        return Err(Status::invalid_argument(format!("{field} is {n} characters; at most {max} are accepted")));
    }
    Ok(())
}

/// `value` cut to `max` characters, marked when cut.
pub fn cut(value: &str, max: usize) -> String {
    match value.char_indices().nth(max) {
        Some((at, _)) => format!("{}… (cut: {} characters in all)", &value[..at], value.chars().count()),
        None => value.to_string(),
    }
}

/// The page size for a request's `page_size` (0: the default), capped.
pub fn page(requested: u32, (default, max): (usize, usize)) -> usize {
    if requested == 0 { default } else { (requested as usize).min(max) }
}

/// A page token (the last id of the previous page) back to the id; "" is the first page.
pub fn page_token(token: &str) -> Result<Option<u64>, Status> {
    if token.is_empty() {
        return Ok(None);
    }
    token.parse().map(Some).map_err(|_| Status::invalid_argument(format!("page_token '{}' is not one this coordinator gave out", cut(token, 32))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds() {
        assert!(text("hostname", "h", 1).is_ok());
        let e = text("hostname", "hh", 1).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().contains("hostname is 2 characters; at most 1"), "{}", e.message());
        assert_eq!(cut("错误信息", 2), "错误… (cut: 4 characters in all)");
        assert_eq!(cut("ok", 2), "ok");
        assert_eq!((page(0, JOBS_PAGE), page(7, JOBS_PAGE), page(9999, JOBS_PAGE)), (100, 7, 500));
        assert_eq!(page_token("").unwrap(), None);
        assert_eq!(page_token("42").unwrap(), Some(42));
        assert_eq!(page_token("x").unwrap_err().code(), tonic::Code::InvalidArgument);
    }
}
