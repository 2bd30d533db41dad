//! Transposes against the index math on random data, for f32 and bf16 and the model shapes.

use freekv_layout::{
    PageGeometry, PageLayout, hnd_to_nhd, hnd_unit_to_nhd_slice, nhd_slice_to_hnd_unit, nhd_to_hnd,
};
use half::bf16;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn check<T: Copy + Default + PartialEq + std::fmt::Debug>(
    g: PageGeometry,
    rng: &mut StdRng,
    make: fn(&mut StdRng) -> T,
) {
    let n = g.page_elems();
    let nhd: Vec<T> = (0..n).map(|_| make(rng)).collect();
    let mut hnd = vec![T::default(); n];
    nhd_to_hnd(g, &nhd, &mut hnd).unwrap();
    for kv in 0..2 {
        for t in 0..g.page_size {
            for h in 0..g.kv_heads {
                for d in 0..g.head_dim {
                    assert_eq!(
                        hnd[PageLayout::Hnd.index(g, kv, t, h, d)],
                        nhd[PageLayout::Nhd.index(g, kv, t, h, d)]
                    );
                }
            }
        }
    }
    let mut back = vec![T::default(); n];
    hnd_to_nhd(g, &hnd, &mut back).unwrap();
    assert_eq!(back, nhd);
    // Per-head units rebuild the page one head at a time, in any order.
    let mut rebuilt = vec![T::default(); n];
    let u = g.head_unit_elems();
    let mut heads: Vec<usize> = (0..g.kv_heads).collect();
    heads.reverse();
    for h in heads {
        hnd_unit_to_nhd_slice(g, h, &hnd[h * u..(h + 1) * u], &mut rebuilt).unwrap();
        let mut unit = vec![T::default(); u];
        nhd_slice_to_hnd_unit(g, h, &nhd, &mut unit).unwrap();
        assert_eq!(unit, &hnd[h * u..(h + 1) * u]);
    }
    assert_eq!(rebuilt, nhd);
}

#[test]
fn random_pages_f32_and_bf16() {
    let mut rng = StdRng::seed_from_u64(42);
    let shapes = [
        (32, 3, 64),
        (32, 8, 128),
        (16, 4, 128),
        (1, 1, 1),
        (7, 5, 3),
    ];
    for (p, h, d) in shapes {
        let g = PageGeometry::new(p, h, d).unwrap();
        check::<f32>(g, &mut rng, |r| r.random_range(-4.0..4.0));
        check::<bf16>(g, &mut rng, |r| bf16::from_f32(r.random_range(-4.0..4.0)));
    }
    for _ in 0..50 {
        let g = PageGeometry::new(
            rng.random_range(1..40),
            rng.random_range(1..9),
            rng.random_range(1..140),
        )
        .unwrap();
        check::<u16>(g, &mut rng, |r| r.random());
    }
}
