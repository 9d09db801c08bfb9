//! [`PerRank`]: a job's per-rank state, held only for ranks that reported.

use serde::{Deserialize, Serialize};

/// Values by rank, only for ranks that have one: a rank number costs nothing
/// until its rank reports, whatever the number (rank 65,535 of a job costs
/// what rank 0 does).
///
/// The values stay where they arrived (a new rank moves none of them); an
/// index sorted by rank finds them. Ranks `0..n` reporting, the usual case,
/// are found at their own position in the index without a search.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct PerRank<T> {
    /// `(rank, position in values)`, sorted by rank.
    index: Vec<(u32, u32)>,
    values: Vec<T>,
}

impl<T> Default for PerRank<T> {
    fn default() -> Self {
        Self {
            index: Vec::new(),
            values: Vec::new(),
        }
    }
}

impl<T> PerRank<T> {
    /// Where `rank` is, or would be, in the index.
    fn find(&self, rank: u32) -> Result<usize, usize> {
        match self.index.get(rank as usize) {
            Some(&(r, _)) if r == rank => Ok(rank as usize),
            _ => self.index.binary_search_by_key(&rank, |e| e.0),
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.values.len()
    }

    pub(crate) fn get(&self, rank: u32) -> Option<&T> {
        let at = self.find(rank).ok()?;
        Some(&self.values[self.index[at].1 as usize])
    }

    pub(crate) fn get_mut(&mut self, rank: u32) -> Option<&mut T> {
        let at = self.find(rank).ok()?;
        Some(&mut self.values[self.index[at].1 as usize])
    }

    /// The rank's value, made by `new` if the rank has none yet; true when new.
    pub(crate) fn get_or_insert_with(&mut self, rank: u32, new: impl FnOnce() -> T) -> (&mut T, bool) {
        match self.find(rank) {
            Ok(at) => (&mut self.values[self.index[at].1 as usize], false),
            Err(at) => {
                self.index.insert(at, (rank, self.values.len() as u32));
                self.values.push(new());
                (self.values.last_mut().expect("pushed above"), true)
            }
        }
    }

    /// Every value, in no particular order (for folds: the newest, the slowest).
    pub(crate) fn values(&self) -> impl Iterator<Item = &T> {
        self.values.iter()
    }

    /// Calls `f` with each rank and its value, by rank.
    pub(crate) fn for_each_mut(&mut self, mut f: impl FnMut(u32, &mut T)) {
        for &(rank, at) in &self.index {
            f(rank, &mut self.values[at as usize]);
        }
    }

    /// Heap bytes held (the index and the values' inline size).
    pub(crate) fn heap_bytes(&self) -> usize {
        self.index.capacity() * std::mem::size_of::<(u32, u32)>() + self.values.capacity() * std::mem::size_of::<T>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_every_rank_in_any_arrival_order_and_visits_them_by_rank() {
        for ranks in [vec![0, 1, 2, 3], vec![3, 2, 1, 0], vec![65535, 7, 0, 1000, 2]] {
            let mut m = PerRank::default();
            for &r in &ranks {
                let (v, new) = m.get_or_insert_with(r, || r * 10);
                assert!(new);
                assert_eq!(*v, r * 10);
            }
            for &r in &ranks {
                assert_eq!(m.get(r), Some(&(r * 10)));
                let (_, new) = m.get_or_insert_with(r, || unreachable!());
                assert!(!new);
            }
            assert_eq!(m.get(5), None);
            assert_eq!(m.len(), ranks.len());
            let mut seen = Vec::new();
            m.for_each_mut(|r, v| {
                *v += 1;
                seen.push(r);
            });
            let mut sorted = ranks.clone();
            sorted.sort_unstable();
            assert_eq!(seen, sorted);
            assert_eq!(*m.get_mut(ranks[0]).unwrap(), ranks[0] * 10 + 1);
        }
    }

    #[test]
    fn a_high_rank_costs_one_entry() {
        let mut m = PerRank::default();
        m.get_or_insert_with(65535, || [0u8; 100]);
        // A few entries' room (a vector's first allocation), not 65,536.
        assert!(m.heap_bytes() < 1024, "{}", m.heap_bytes());
    }
}
