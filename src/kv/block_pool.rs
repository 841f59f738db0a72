//! The pool of KV-cache blocks: which are free, and handing them to sequences.

/// Free-list allocator over `num_blocks` blocks of `block_size` token slots.
#[derive(Debug)]
pub struct BlockPool {
    free: Vec<u32>,
    num_blocks: usize,
    block_size: usize,
}

impl BlockPool {
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        // Reversed so that blocks are handed out in ascending order.
        Self {
            free: (0..num_blocks as u32).rev().collect(),
            num_blocks,
            block_size,
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    pub fn num_free(&self) -> usize {
        self.free.len()
    }

    /// Blocks needed to hold `tokens` token slots.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }

    /// Grows `table` until it covers `tokens` slots; false (and no change) if the pool is short.
    pub fn grow(&mut self, table: &mut Vec<u32>, tokens: usize) -> bool {
        let need = self.blocks_for(tokens).saturating_sub(table.len());
        if need > self.free.len() {
            return false;
        }
        let at = self.free.len() - need;
        table.extend(self.free.drain(at..).rev());
        true
    }

    /// Returns every block of `table` to the pool.
    pub fn release(&mut self, table: &mut Vec<u32>) {
        self.free.extend(table.drain(..).rev());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grow_and_release() {
        let mut pool = BlockPool::new(4, 16);
        let mut a = Vec::new();
        assert!(pool.grow(&mut a, 17));
        assert_eq!(a, vec![0, 1]);
        assert!(pool.grow(&mut a, 32), "already covered");
        assert_eq!(a.len(), 2);
        let mut b = Vec::new();
        assert!(!pool.grow(&mut b, 49), "needs 4 blocks, 2 free");
        assert!(b.is_empty());
        assert!(pool.grow(&mut b, 20));
        assert_eq!(pool.num_free(), 0);
        pool.release(&mut a);
        assert!(a.is_empty());
        assert_eq!(pool.num_free(), 2);
    }
}
