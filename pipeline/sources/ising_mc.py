"""Monte Carlo of the 2-D Ising model: the samplers behind the ising2d source, the independent
reference of `hpcforge evaluate`, and the autocorrelation time that sizes their burn-in (issue #23).

H = -sum_<ij> s_i s_j on an L x L periodic lattice, J = k_B = 1. Three exact Markov chains for the
Boltzmann distribution exp(-H / T) / Z, all vectorised over many independent lattices (N, L, L),
each at its own temperature (the source uses the first two, `chain`):

  * checkerboard Metropolis (Metropolis et al. 1953): one sweep updates the two sublattices in
    turn. Near T_c it suffers critical slowing down, tau ~ L^z with z ~ 2.17: measured here
    tau_int(|m|) ~ 43 sweeps at L = 32 and ~ 173 at L = 64;
  * Swendsen-Wang (PRL 58, 86, 1987): bonds between equal neighbours are kept with probability
    1 - exp(-2 / T), the connected clusters (scipy.sparse.csgraph.connected_components) are each
    flipped with probability 1/2. Its tau is a few sweeps at every T on these lattices, so a few
    tens of sweeps equilibrate a lattice from any start;
  * Wolff's single-cluster update (PRL 62, 361, 1989, `Wolff`): one of these Fortuin-Kasteleyn
    clusters, grown from a random site, is flipped; the physicist's usual baseline, measured
    beside the others in benchmarks/ising_speed.py (at L = 32 and 64 it costs what
    Swendsen-Wang does per independent lattice, in NumPy).

`integrated_time` estimates tau_int with Sokal's automatic window, as emcee's
`autocorr.integrated_time` does (10 lines; written here rather than adding a dependency).
"""
from __future__ import annotations

import math

import numpy as np

from pipeline import physics

T_CRITICAL = 2.0 / math.log(1.0 + math.sqrt(2.0))
ALGORITHMS = ("metropolis", "swendsen_wang")


def start(temperatures: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """The source's initial lattices (N, L, L) int8: ordered (one random global sign) below T_c,
    random above, so that a short burn-in does not freeze domain walls."""
    t = np.asarray(temperatures, np.float64)
    hot = rng.choice(np.array([-1, 1], np.int8), size=(len(t), size, size))
    cold = np.ones((len(t), size, size), np.int8) * rng.choice(np.array([-1, 1], np.int8),
                                                              size=(len(t), 1, 1))
    return np.where((t < T_CRITICAL)[:, None, None], cold, hot)


class Metropolis:
    """Checkerboard Metropolis sweeps of lattices (N, L, L) at temperatures (N,), L even."""

    def __init__(self, temperatures: np.ndarray, size: int):
        t = np.asarray(temperatures, np.float64)
        # table[c, k]: chain c's acceptance min(1, exp(-dE / T)) for dE = 4k - 8
        self.table = np.minimum(1.0, np.exp(-np.array([-8, -4, 0, 4, 8])[None, :] / t[:, None]))
        ij = np.add.outer(np.arange(size), np.arange(size)) % 2
        self.masks = ((ij == 0)[None], (ij == 1)[None])

    def sweep(self, s: np.ndarray, rng: np.random.Generator) -> None:
        """One sweep in place: the two checkerboard sublattices in turn."""
        chain = np.arange(s.shape[0])[:, None, None]
        for mask in self.masks:
            nb = np.roll(s, 1, 1) + np.roll(s, -1, 1) + np.roll(s, 1, 2) + np.roll(s, -1, 2)
            d_e = 2 * s.astype(np.int32) * nb                # energy change of each flip, -8..8
            flip = mask & (rng.random(s.shape) < self.table[chain, (d_e + 8) // 4])
            s[flip] *= -1


class SwendsenWang:
    """Swendsen-Wang cluster sweeps of lattices (N, L, L) at temperatures (N,)."""

    def __init__(self, temperatures: np.ndarray, size: int):
        t = np.asarray(temperatures, np.float64)
        self.p_bond = (1.0 - np.exp(-2.0 / t))[:, None, None]
        self.index = np.arange(len(t) * size * size).reshape(len(t), size, size)

    def sweep(self, s: np.ndarray, rng: np.random.Generator) -> None:
        """One sweep in place: every cluster flipped with probability 1/2."""
        from scipy.sparse import coo_matrix
        from scipy.sparse.csgraph import connected_components
        rows, cols = [], []
        for axis in (1, 2):          # bonds to the right and downwards: each bond once
            on = (s == np.roll(s, -1, axis)) & (rng.random(s.shape) < self.p_bond)
            rows.append(self.index[on])
            cols.append(np.roll(self.index, -1, axis)[on])
        r, c = np.concatenate(rows), np.concatenate(cols)
        n = self.index.size
        graph = coo_matrix((np.ones(len(r), np.int8), (r, c)), shape=(n, n)).tocsr()
        n_clusters, label = connected_components(graph, directed=False)
        sign = np.where(rng.random(n_clusters) < 0.5, -1, 1).astype(np.int8)
        s *= sign[label].reshape(s.shape)


class Wolff:
    """Wolff's single-cluster update (PRL 62, 361, 1989) of lattices (N, L, L) at temperatures
    (N,): per lattice, a random seed site, its Fortuin-Kasteleyn cluster grown by adding each
    aligned neighbour of a cluster site with probability 1 - exp(-2 / T) (each bond tried once),
    then flipped. One step flips one cluster in every lattice.

    Vectorised over lattices by growing all clusters layer by layer (breadth first) on flat site
    indices: the work of a layer is proportional to its frontier, so a flip costs in proportion
    to its cluster, as Wolff's does, plus a fixed NumPy overhead per layer shared by the N
    lattices. `sizes` holds the last step's cluster sizes: a step is <sizes> / L^2 sweeps."""

    def __init__(self, temperatures: np.ndarray, size: int):
        t = np.asarray(temperatures, np.float64)
        self.p_add = 1.0 - np.exp(-2.0 / t)
        self.size = size
        self.in_cluster = np.zeros(len(t) * size * size, bool)
        self.stamp = np.zeros(len(t) * size * size, np.int64)  # scratch: de-duplicates a layer
        self.sizes = np.zeros(len(t), np.int64)

    def sweep(self, s: np.ndarray, rng: np.random.Generator) -> None:
        """One cluster flip in each lattice, in place (named as the other chains' step)."""
        n, side = s.shape[0], self.size
        area = side * side
        flat = s.reshape(-1)
        if not np.shares_memory(flat, s):
            raise ValueError("Wolff.sweep: the lattices must be one contiguous array")
        frontier = np.arange(n) * area + rng.integers(0, area, n)
        spin = flat[frontier].copy()                         # the cluster's spin, per lattice
        in_cluster, stamp, added = self.in_cluster, self.stamp, [frontier]
        in_cluster[frontier] = True
        while frontier.size:
            lattice, site = np.divmod(frontier, area)
            i, j = np.divmod(site, side)
            base = lattice * area
            nb = np.concatenate([base + ((i + 1) % side) * side + j, base + ((i - 1) % side) * side + j,
                                 base + i * side + (j + 1) % side, base + i * side + (j - 1) % side])
            owner = np.tile(lattice, 4)
            ok = ~in_cluster[nb] & (flat[nb] == spin[owner])    # an aligned site not yet in it
            nb, owner = nb[ok], owner[ok]
            nb = nb[rng.random(nb.size) < self.p_add[owner]]   # each bond tried once
            stamp[nb] = np.arange(nb.size)                      # a site reached twice: keep one
            frontier = nb[stamp[nb] == np.arange(nb.size)]
            in_cluster[frontier] = True
            added.append(frontier)
        sites = np.concatenate(added)
        flat[sites] *= -1
        in_cluster[sites] = False
        self.sizes = np.bincount(sites // area, minlength=n)


def chain(algorithm: str, temperatures: np.ndarray, size: int) -> Metropolis | SwendsenWang:
    if algorithm not in ALGORITHMS:
        raise ValueError(f"ising2d: algorithm {algorithm!r}: expected one of {', '.join(ALGORITHMS)}")
    return (Metropolis if algorithm == "metropolis" else SwendsenWang)(temperatures, size)


def equilibrium(temperatures: np.ndarray, size: int, rng: np.random.Generator,
                algorithm: str = "swendsen_wang", burn_in: int = 40) -> np.ndarray:
    """One independent lattice per temperature (N, L, L) int8: its own chain from the source's
    start, `burn_in` sweeps long. Nothing is shared between lattices, so any split of them (or a
    second call with another rng) is independent of the rest."""
    s = start(temperatures, size, rng)
    mc = chain(algorithm, temperatures, size)
    for _ in range(burn_in):
        mc.sweep(s, rng)
    return s


def integrated_time(x: np.ndarray, c: float = 5.0) -> float:
    """tau_int = 1 + 2 sum_t rho(t) of a time series (or the mean over series (K, T) of
    independent chains), summed up to Sokal's window, the smallest M >= c tau(M)."""
    x = np.atleast_2d(np.asarray(x, np.float64))
    x = x - x.mean(axis=1, keepdims=True)
    n = x.shape[1]
    f = np.fft.rfft(x, 2 * n)                  # autocovariance by FFT, zero-padded (no wrap)
    acf = np.fft.irfft(f * np.conj(f))[:, :n].mean(axis=0)
    if acf[0] <= 0:
        return 1.0
    taus = 2.0 * np.cumsum(acf / acf[0]) - 1.0
    window = np.arange(n) >= c * taus
    return float(taus[np.argmax(window)] if window.any() else taus[-1])


def series(algorithm: str, temperature: float, size: int, chains: int, sweeps: int,
           rng: np.random.Generator, burn_in: int = 0, initial: np.ndarray | None = None
           ) -> dict[str, np.ndarray]:
    """|m| and e per spin of `chains` chains after each of `sweeps` sweeps: (chains, sweeps),
    from the source's start or from `initial` lattices (chains, L, L). `algorithm` "wolff"
    steps by one cluster flip (Wolff.sweep); its series also holds "cluster_size", the sites
    flipped at each step."""
    t = np.full(chains, temperature)
    s = start(t, size, rng) if initial is None else np.array(initial, np.int8)
    mc = Wolff(t, size) if algorithm == "wolff" else chain(algorithm, t, size)
    for _ in range(burn_in):
        mc.sweep(s, rng)
    m, e = np.empty((chains, sweeps)), np.empty((chains, sweeps))
    sizes = np.empty((chains, sweeps))
    for k in range(sweeps):
        mc.sweep(s, rng)
        m[:, k] = np.abs(physics.ising_magnetization(s))
        e[:, k] = physics.ising_energy(s)
        if algorithm == "wolff":
            sizes[:, k] = mc.sizes
    out = {"abs_magnetization": m, "energy": e}
    return {**out, "cluster_size": sizes} if algorithm == "wolff" else out
