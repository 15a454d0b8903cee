//! The cuts the codec targets feed a body through: pieces of the input, mostly tiny (where
//! framing lines get cut) and now and then large, chosen as a function of the input so a
//! crash replays.

/// `rest` cut into pieces, the cuts seeded by `data`.
pub fn pieces<'a>(data: &[u8], rest: &'a [u8]) -> Vec<&'a [u8]> {
    let mut seed = seed_of(data);
    let mut pieces = Vec::new();
    let mut at = 0;
    while at < rest.len() {
        seed = next(seed);
        let len = if seed % 8 == 0 {
            seed as usize % 512
        } else {
            seed as usize % 5
        } + 1;
        let end = (at + len).min(rest.len());
        pieces.push(&rest[at..end]);
        at = end;
    }
    pieces
}

/// FNV-1a of the input.
pub fn seed_of(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    }) | 1
}

/// xorshift64.
fn next(mut x: u64) -> u64 {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    x
}
