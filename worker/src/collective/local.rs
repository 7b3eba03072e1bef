//! The collective of a single process: world 1, where the sum over all ranks is the rank's own
//! value. It exists so the training loop has one code path whether it runs alone or in a ring.

use super::{Collective, CollectiveError};

/// World 1: every op is a no-op and the scalar sum is the value itself.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Local;

impl Collective for Local {
    fn rank(&self) -> usize {
        0
    }

    fn world(&self) -> usize {
        1
    }

    fn all_reduce_sum(&mut self, _buf: &mut [f32]) -> Result<(), CollectiveError> {
        Ok(())
    }

    fn all_reduce_scalar(&mut self, x: f64) -> Result<f64, CollectiveError> {
        Ok(x)
    }

    fn barrier(&mut self) -> Result<(), CollectiveError> {
        Ok(())
    }

    fn all_gather(&mut self, _buf: &mut [f32]) -> Result<(), CollectiveError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_is_identity() {
        let mut c: Box<dyn Collective> = Box::new(Local);
        assert_eq!((c.rank(), c.world()), (0, 1));
        let mut buf = [1.5f32, -2.0, 0.0];
        c.all_reduce_sum(&mut buf).expect("local all-reduce cannot fail");
        assert_eq!(buf, [1.5, -2.0, 0.0]);
        assert_eq!(c.all_reduce_scalar(3.25).expect("local scalar cannot fail"), 3.25);
        c.barrier().expect("local barrier cannot fail");
    }
}
