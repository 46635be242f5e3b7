"""A bank's working slots: the few tasks' masked kernels (and own weights) kept unpacked, least
recently used first out, and how concurrent calls share them (BUILD.md, "Many tasks in one
SavedModel"). `graph.BankGraph` holds one `WorkingSlots`; every version with its layout shares it.

Concurrency (TensorFlow Serving runs requests in parallel): each slot is one variable whose
last entries are the id of the task whose kernels it holds. A TensorFlow variable read is a
snapshot (an assignment while a reader holds the buffer writes a new one), so a call that
reads a slot and finds its own task's id there uses kernels of that task only, without a
lock. A call that misses takes the one fill lock (a TensorFlow mutex), looks again and
otherwise fills a slot: one unpack at a time, and N concurrent cold calls of one task unpack it
once (`WorkingSlots.refills` counts fills). Slots are tagged with a task's uid, which a bank never
reuses, so the versions that share a graph share its slots safely. A request still computing
with a slot's old copy keeps it alive until it finishes, so under load memory can briefly hold
one more copy per such request.

Reference: §3, last paragraph (only the thresholded masks are kept).
"""

import typing
import uuid

import tensorflow as tf

from tf_piggyback.serving.packing import ID_BITS, unpack_binary, unpack_ternary


class _Pool(typing.NamedTuple):
    """One kind of working slots of `WorkingSlots`: its slot variables, the hint of which task's uid
    each holds, when each was last used, and how a held value names its task (`uid_of`). Made
    at trace time from the graph's tracked variables (a tf.Module tracks its attributes, not a
    tuple's callable)."""

    slots: list
    uids: tf.Variable
    used: tf.Variable
    uid_of: typing.Callable


class WorkingSlots(tf.Module):
    """`count` working slots of masked kernels (each `flat_size` floats, then a task's id entries)
    and as many of own weights, with their one fill lock.

    Args:
        count: working slots (>= 1) of each kind.
        flat_size: floats in one slot's kernels (`PackedLayout.flat_size`), without the id entries.
    """

    def __init__(self, count, flat_size):
        super().__init__()
        self.flat_size = int(flat_size)
        # The working slots: saved holding one element (-1: no task's kernels), so the file keeps
        # 1 bit per parameter; filled on first use.
        self.slots = [tf.Variable([-1.0], shape=tf.TensorShape([None]), trainable=False, name=f"slot{i}")
                      for i in range(count)]
        self.slot_uids = tf.Variable([-1.0] * count, trainable=False)  # a hint; the slot's id entries decide
        self.slot_used = tf.Variable([0] * count, trainable=False, dtype=tf.int64)
        # A task's own weights (per-task normalization, head) beside its kernels, its uid last: a
        # version whose tasks are in files reads a task's `.own` only to fill one, so a warm call
        # reads no file and a deleted or overwritten version folder costs only its cold tasks.
        self.own_slots = [tf.Variable([-1.0], shape=tf.TensorShape([None]), trainable=False, name=f"own_slot{i}")
                          for i in range(count)]
        self.own_slot_uids = tf.Variable([-1.0] * count, trainable=False)
        self.own_slot_used = tf.Variable([0] * count, trainable=False, dtype=tf.int64)
        self.clock = tf.Variable(0, trainable=False, dtype=tf.int64)
        self.refills = tf.Variable(0, trainable=False, dtype=tf.int64)  # slots filled since loading
        # The fill lock (`_locked_fill`): a mutex resource that every call of these slots'
        # functions finds by this name, in the Python API and in a loaded SavedModel alike.
        self._lock_name = f"tf_piggyback_bank_fill_{uuid.uuid4().hex}"

    def kernels(self, weights, packed, kind, uid):
        """`[flat_size + ID_BITS]`: `weights` (the backbone's kernels, flat, then `ID_WEIGHTS`)
        masked by the task whose packed masks (flat, aligned, then its id) `packed()` gives
        (called only to fill a slot: it may read a file), then its id's entries.

        A hit reads a slot without a lock. A miss takes the fill lock, looks again (a request
        that waited may find its task filled by the one before it) and otherwise fills the
        least recently used slot, so concurrent cold calls of one task unpack it once.
        """
        def fill():
            # One multiplication, in place on the unpacked mask; its last ID_BITS entries are the id.
            values, masks = weights.read_value(), packed()
            return values * tf.cond(tf.equal(kind, 1), lambda: unpack_binary(masks), lambda: unpack_ternary(masks))

        pool = self._kernel_pool()
        return tf.cond(tf.equal(kind, 0), weights.read_value, lambda: self._from_pool(pool, fill, uid))

    def own(self, read, uid):
        """`[own + head]`: the own weights of task `uid` (per-task normalization, then its head)
        that `read()` gives (called only to fill an own slot: it reads the task's `.own` file),
        from its own slot; as `kernels`, a hit takes no lock and a miss fills the least recently
        used own slot under the fill lock."""
        pool = _Pool(self.own_slots, self.own_slot_uids, self.own_slot_used, lambda held: held[-1])
        return self._from_pool(pool, lambda: tf.concat([read(), [uid]], 0), uid)[:-1]

    def _kernel_pool(self):
        def uid_of(held):  # a slot holding no task's kernels (saved as [-1]) has no id entries
            return tf.cond(tf.equal(tf.size(held), self.flat_size + ID_BITS),
                           lambda: tf.reduce_sum(held[-ID_BITS:]), lambda: tf.constant(-1.0))
        return _Pool(self.slots, self.slot_uids, self.slot_used, uid_of)

    def _from_pool(self, pool, fill, uid):
        hit, slot, held = self._slot_holding(pool, uid)
        return tf.cond(hit, lambda: self._used(pool, slot, held), lambda: self._locked_fill(pool, fill, uid))

    def _slot_holding(self, pool, uid):
        """`(hit, slot, value)`: whether the slot of `pool` the hint names for `uid` holds `uid`'s
        value (the hint may be stale; the value's own id decides) and, if so, a snapshot of it
        (else empty). No slot is read when none is hinted, so a refilled slot's old copy is freed
        as it is replaced."""
        hits = tf.where(tf.equal(pool.uids.read_value(), uid))[:, 0]

        def lookup():
            slot = tf.cast(hits[0], tf.int32)
            held = tf.switch_case(slot, [lambda s=s: s.read_value() for s in pool.slots])
            hit = tf.equal(pool.uid_of(held), uid)
            # A snapshot of another task's value is let go here, not kept through a refill.
            return hit, slot, tf.cond(hit, lambda: held, lambda: tf.zeros([0], tf.float32))

        return tf.cond(tf.size(hits) > 0, lookup,
                       lambda: (tf.constant(False), tf.constant(-1), tf.zeros([0], tf.float32)))

    def _locked_fill(self, pool, fill, uid):
        """The task's value from a slot of `pool` or a fill, with the fill lock held (see `kernels`).

        Only fills write slots, and every fill holds the lock, so the read that follows a
        slot's assignment is that assignment's value (an assignment and a read are two
        operations; without the lock, a racing fill in between gave another task's kernels).
        """
        lock = tf.raw_ops.MutexLock(mutex=tf.raw_ops.MutexV2(shared_name=self._lock_name))
        with tf.control_dependencies([lock]):
            hit, slot, held = self._slot_holding(pool, uid)
            value = tf.cond(hit, lambda: self._used(pool, slot, held), lambda: self._fill(pool, fill, uid))
            check = tf.debugging.assert_equal(pool.uid_of(value), uid,
                                              message="a working slot holds another task's kernels")
        with tf.control_dependencies([value, check]):
            release = tf.raw_ops.ConsumeMutexLock(mutex_lock=lock)
        with tf.control_dependencies([release]):
            return tf.identity(value)

    def _used(self, pool, slot, value):
        """`value`, read from `slot`, once the slot is marked as used now (least recently used
        first out; outside the lock two hits may tick in either order, which only orders them)."""
        with tf.control_dependencies([pool.used.scatter_nd_update([[slot]], [self.clock.assign_add(1)])]):
            return tf.identity(value)

    def _fill(self, pool, fill, uid):
        """Stores `fill()` (its id last) in the least recently used slot of `pool` (called with the
        fill lock held)."""
        tick = self.clock.assign_add(1)
        value = fill()
        slot = tf.cast(tf.argmin(pool.used.read_value()), tf.int32)
        pool.uids.scatter_nd_update([[slot]], [uid])
        pool.used.scatter_nd_update([[slot]], [tick])
        if pool.slots is self.slots:
            self.refills.assign_add(1)

        # The slot adopts `value`'s buffer (its only user is the assignment) and the call reads
        # it back: no copy. Measured: TensorFlow's CPU allocator keeps freed buffers resident,
        # so every transient 94 MB copy of ResNet-50's kernels would stay in RSS for good.
        def store(variable):
            return variable.assign(value, read_value=True)

        return tf.switch_case(slot, [lambda s=s: store(s) for s in pool.slots])
