/// The talk's `Pool`: every worker's `pending` count, and an indexed binary
/// min-heap of the workers that may take new work.
///
/// Workers are named by their small integer id. Each has a record holding its
/// `pending` (requests queued on it or running) and its `index`: its position in
/// `heap`, or `nil` while it is out of the heap (taken off by `dispatch`,
/// draining, removed). The heap is ordered by `(load, group pending,
/// lastDispatch, id)`, where a worker's load is its `pending` plus any load
/// held against it (below): ties in load go first to the worker whose group
/// has the fewest pending, then to the worker dispatched to least recently
/// (round-robin among equals, as nginx's least_conn and HAProxy's leastconn
/// do), then to the lowest id.
///
/// A group is a set of workers that share one resource: the connections of
/// one upstream backend. Each of them runs one request at a time, so their own
/// `pending` (0 or 1) cannot tell an idle connection to a busy, slow backend
/// from one to an idle backend; the group's total can, and with it the pool
/// prefers the backend with the fewest requests in flight (HAProxy's
/// leastconn, which counts per server). A worker without a group is a group
/// of its own, and the order among such workers is `(load, lastDispatch, id)`.
///
/// Held load is work a worker's resource still does for a request the pool's
/// caller gave up on (a hedged request's loser, whose backend goes on serving
/// it after its connection closed): it counts in the worker's load and its
/// group's like a pending request, but is not `pending`, which stays the
/// exact count of requests queued or running (``addHeldLoad(_:to:)``). What a
/// worker held when it left the pool stays with its group
/// (``addGroupLoad(_:to:)``).
///
/// Every operation keeps each record's `index` right; without that upkeep
/// `completed` would fix up the wrong worker and the heap would silently rot.
/// swift-collections' `Heap` has no remove or fix at an index, hence this type.
///
/// The pool is a value owned by one `Balancer` actor; it does no locking.
public struct Pool: Sendable {
    /// One worker's entry.
    public struct Record: Sendable, Equatable {
        /// Requests queued on this worker or running on it.
        public var pending: Int
        /// Position in the heap, `nil` while the worker is out of it.
        public internal(set) var index: Int?
        /// When it was last dispatched to, as a count of dispatches; 0 if never.
        public internal(set) var lastDispatch = 0
        /// The worker's group, or -1 for none.
        public internal(set) var group = -1
        /// Load held against this worker that is not `pending`
        /// (``addHeldLoad(_:to:)``).
        public internal(set) var held = 0
        /// What its place in the heap, and every choice, counts: `pending + held`.
        public var load: Int { pending + held }
    }

    /// Records by worker id; `nil` for ids not (or no longer) in the pool.
    private var records: [Record?] = []
    /// Worker ids in heap order.
    private var heap: [Int] = []
    /// Dispatches recorded so far, for `lastDispatch`.
    private var dispatches = 0
    /// By group: the sum of its members' `pending` plus its held load (its
    /// members' and what members that left held), and its members' ids.
    private var groups: [(pending: Int, members: [Int])] = []
    /// Scratch space for ``changeGroup(_:by:)``, kept so that a change of
    /// pending (two per request) allocates nothing.
    private var groupScratch: [Int] = []

    public init() {}

    /// The number of workers in the heap.
    public var count: Int { heap.count }
    /// Whether no worker is in the heap.
    public var isEmpty: Bool { heap.isEmpty }
    /// The id at the top of the heap: a worker with the least load.
    public var min: Int? { heap.first }
    /// The id of the worker at heap position `i`.
    public func id(at i: Int) -> Int { heap[i] }

    /// The record of worker `id`, if it is in the pool.
    public subscript(id: Int) -> Record? {
        id >= 0 && id < records.count ? records[id] : nil
    }

    /// `pending` of worker `id`; the worker must be in the pool.
    public func pending(of id: Int) -> Int {
        records[id]!.pending
    }

    /// `pending` of worker `id` plus the load held against it: what choices
    /// count, room included; the worker must be in the pool.
    public func load(of id: Int) -> Int {
        records[id]!.load
    }

    /// The sum of `pending` over worker `id`'s group plus the group's held
    /// load (its own load if it has none); the worker must be in the pool.
    public func groupPending(of id: Int) -> Int {
        groupPending(records[id]!)
    }

    @inline(__always)
    private func groupPending(_ record: Record) -> Int {
        record.group < 0 ? record.load : groups[record.group].pending
    }

    /// Registers worker `id` with `pending` 0, outside the heap, as a member
    /// of `group` (a small non-negative number) or of none.
    public mutating func insert(_ id: Int, group: Int? = nil) {
        precondition(id >= 0, "worker ids are non-negative")
        if id >= records.count {
            records.append(contentsOf: repeatElement(nil, count: id - records.count + 1))
        }
        precondition(records[id] == nil, "worker \(id) is already in the pool")
        records[id] = Record(pending: 0, index: nil, lastDispatch: 0, group: group ?? -1)
        if let group {
            precondition(group >= 0, "groups are non-negative")
            if group >= groups.count {
                groups.append(contentsOf: repeatElement((pending: 0, members: [Int]()), count: group - groups.count + 1))
            }
            groups[group].members.append(id)
        }
    }

    /// Forgets worker `id`; it must be out of the heap.
    public mutating func delete(_ id: Int) {
        precondition(records[id]?.index == nil, "delete a worker only after taking it out of the heap")
        let record = records[id]!
        records[id] = nil
        if record.group >= 0 {
            groups[record.group].members.removeAll { $0 == id }
            changeGroup(record.group, by: -record.pending)
        }
    }

    /// Changes `pending` of worker `id` by `delta`, which the caller does while
    /// the worker is out of the heap (or calls `fix` after).
    ///
    /// - Precondition: `pending` never goes below zero.
    public mutating func addPending(_ delta: Int, to id: Int) {
        let new = records[id]!.pending + delta
        precondition(new >= 0, "pending of worker \(id) would fall below zero")
        records[id]!.pending = new
        if records[id]!.group >= 0 { changeGroup(records[id]!.group, by: delta) }
    }

    /// Adds `delta` to `group`'s load without changing any member's
    /// `pending` (see ``groupPending(of:)``), and restores heap order; the
    /// holder takes it back with `-delta`. `group` must have had a member.
    ///
    /// - Precondition: the group's load never goes below zero.
    public mutating func addGroupLoad(_ delta: Int, to group: Int) {
        precondition(groups.indices.contains(group), "group \(group) has no members")
        precondition(groups[group].pending + delta >= 0, "the load of group \(group) would fall below zero")
        changeGroup(group, by: delta)
    }

    /// Adds `delta` to worker `id`'s held load (and to its group's), without
    /// changing its `pending`, and restores heap order; the holder takes it
    /// back with `-delta`. If the worker leaves the pool first, what it held
    /// stays with its group, to be taken back with ``addGroupLoad(_:to:)``.
    ///
    /// - Precondition: the held load never goes below zero.
    public mutating func addHeldLoad(_ delta: Int, to id: Int) {
        let new = records[id]!.held + delta
        precondition(new >= 0, "the held load of worker \(id) would fall below zero")
        records[id]!.held = new
        if records[id]!.group >= 0 {
            changeGroup(records[id]!.group, by: delta)
        } else if let index = records[id]!.index {
            fix(at: index)
        }
    }

    /// The group of worker `id` (nil for none); the worker must be in the pool.
    public func group(of id: Int) -> Int? {
        let group = records[id]!.group
        return group < 0 ? nil : group
    }

    /// Records a dispatch to worker `id`, which must be out of the heap: among
    /// workers with equal load it now comes last.
    public mutating func markDispatched(_ id: Int) {
        precondition(records[id]?.index == nil, "mark a worker while it is out of the heap")
        dispatches += 1
        records[id]!.lastDispatch = dispatches
    }

    /// Puts worker `id` into the heap (Go's `heap.Push`); sets its index.
    public mutating func push(_ id: Int) {
        precondition(records[id] != nil && records[id]!.index == nil, "push a pool worker that is out of the heap")
        heap.append(id)
        records[id]!.index = heap.count - 1
        siftUp(heap.count - 1)
    }

    /// Takes the least-loaded worker off the heap (Go's `heap.Pop`); clears its index.
    public mutating func pop() -> Int? {
        heap.isEmpty ? nil : remove(at: 0)
    }

    /// Takes the worker at heap position `i` off the heap; clears its index.
    @discardableResult
    public mutating func remove(at i: Int) -> Int {
        let last = heap.count - 1
        if i != last {
            swapAt(i, last)
        }
        let id = heap.removeLast()
        records[id]!.index = nil
        if i != last {
            // The element moved into `i` may belong above or below it.
            if !siftDown(i) { siftUp(i) }
        }
        return id
    }

    /// Restores heap order after the load of the worker at position `i`
    /// changed (Go's `heap.Fix`): the talk's remove-then-push in one step.
    public mutating func fix(at i: Int) {
        if !siftDown(i) { siftUp(i) }
    }

    /// Sets `pending` of worker `id` and restores heap order if it is in the heap.
    public mutating func update(_ id: Int, pending: Int) {
        precondition(pending >= 0, "pending never goes below zero")
        let delta = pending - records[id]!.pending
        records[id]!.pending = pending
        if let i = records[id]!.index { fix(at: i) }
        if records[id]!.group >= 0 { changeGroup(records[id]!.group, by: delta) }
    }

    /// Whether heap order holds and every record's index names its own position.
    /// For tests and debug assertions; O(n).
    public var isValid: Bool {
        for (position, id) in heap.enumerated() {
            guard let record = self[id], record.index == position else { return false }
            if position > 0 && less(position, (position - 1) / 2) { return false }
        }
        let inHeap = records.reduce(0) { $0 + ($1?.index == nil ? 0 : 1) }
        return inHeap == heap.count
    }

    // MARK: heap mechanics

    /// Adds `delta` to `group`'s pending and restores heap order around its
    /// members, whose keys all moved the same way: members in the heap are
    /// sifted down deepest first when the group got busier (Floyd's heap
    /// construction), up shallowest first when it got less busy. Each is
    /// then out of order only with its children, or only with its parent,
    /// so that order restores the heap.
    private mutating func changeGroup(_ group: Int, by delta: Int) {
        guard delta != 0 else { return }
        groups[group].pending += delta
        // The members in the heap, in the order to sift them (by position before any moves).
        var members = groupScratch
        groupScratch = []
        members.removeAll(keepingCapacity: true)
        for id in groups[group].members where records[id]?.index != nil { members.append(id) }
        if delta > 0 {
            members.sort { records[$0]!.index! > records[$1]!.index! }
            for id in members { siftDown(records[id]!.index!) }
        } else {
            members.sort { records[$0]!.index! < records[$1]!.index! }
            for id in members { siftUp(records[id]!.index!) }
        }
        groupScratch = members
    }

    @inline(__always)
    private func less(_ a: Int, _ b: Int) -> Bool {
        let x = heap[a]
        let y = heap[b]
        let rx = records[x].unsafelyUnwrapped
        let ry = records[y].unsafelyUnwrapped
        if rx.load != ry.load { return rx.load < ry.load }
        if rx.group != ry.group {
            let (gx, gy) = (groupPending(rx), groupPending(ry))
            if gx != gy { return gx < gy }
        }
        if rx.lastDispatch != ry.lastDispatch { return rx.lastDispatch < ry.lastDispatch }
        return x < y
    }

    @inline(__always)
    private mutating func swapAt(_ a: Int, _ b: Int) {
        heap.swapAt(a, b)
        records[heap[a]]!.index = a
        records[heap[b]]!.index = b
    }

    private mutating func siftUp(_ start: Int) {
        var child = start
        while child > 0 {
            let parent = (child - 1) / 2
            guard less(child, parent) else { return }
            swapAt(child, parent)
            child = parent
        }
    }

    /// Returns whether the element moved.
    @discardableResult
    private mutating func siftDown(_ start: Int) -> Bool {
        var parent = start
        let n = heap.count
        while true {
            let left = 2 * parent + 1
            guard left < n else { break }
            let right = left + 1
            let smaller = right < n && less(right, left) ? right : left
            guard less(smaller, parent) else { break }
            swapAt(parent, smaller)
            parent = smaller
        }
        return parent != start
    }
}
