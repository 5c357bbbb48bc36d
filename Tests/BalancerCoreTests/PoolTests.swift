import Testing

@testable import BalancerCore

@Suite("Pool: the indexed min-heap")
struct PoolTests {
    /// A model of the pool: pending by id, and which ids are in the heap.
    struct Model {
        var pending: [Int: Int] = [:]
        var lastDispatch: [Int: Int] = [:]
        var dispatches = 0
        var inHeap: Set<Int> = []
        /// Each worker's group, for those that have one.
        var group: [Int: Int] = [:]
        /// Load held against each group that has had a member (``Pool/addGroupLoad(_:to:)``),
        /// and against each worker (``Pool/addHeldLoad(_:to:)``), which also counts in its group.
        var held: [Int: Int] = [:]
        var workerHeld: [Int: Int] = [:]

        /// A worker's load: its pending plus what is held against it.
        func load(_ id: Int) -> Int { pending[id]! + workerHeld[id, default: 0] }

        /// Each group's pending: the sum over the pool's workers in it, plus its held load.
        var groupSums: [Int: Int] {
            var sums = held
            for (id, g) in group { sums[g, default: 0] += load(id) }
            return sums
        }

        /// The pending of `id`'s group, given `groupSums`.
        func groupPending(_ id: Int, _ sums: [Int: Int]) -> Int {
            group[id].map { sums[$0]! } ?? load(id)
        }

        var minimum: Int? {
            let sums = groupSums
            return inHeap.min { a, b in
                (load(a), groupPending(a, sums), lastDispatch[a, default: 0], a)
                    < (load(b), groupPending(b, sums), lastDispatch[b, default: 0], b)
            }
        }
    }

    @Test(
        "random push, pop, remove(at:), fix, update and held load keep heap order and every index, with and without groups",
        arguments: [1, 2, 3, 4, 5, 6, 7, 8], [false, true])
    func randomOperationsKeepTheHeapValid(seed: UInt64, grouped: Bool) {
        var rng = SplitMix64(seed: seed)
        var pool = Pool()
        var model = Model()
        var nextID = 0
        for step in 0..<5_000 {
            let choice = Int.random(in: 0..<100, using: &rng)
            switch choice {
            case 0..<15:
                // A new worker joins (up to 64 in the pool, so heaps of every depth up to 6 occur);
                // grouped, it joins one of five groups (backends of up to ~13 connections).
                guard model.pending.count < 64 else { continue }
                let group = grouped ? Int.random(in: 0..<5, using: &rng) : nil
                pool.insert(nextID, group: group)
                model.group[nextID] = group
                if let group, model.held[group] == nil { model.held[group] = 0 }
                model.pending[nextID] = 0
                pool.push(nextID)
                model.inHeap.insert(nextID)
                nextID += 1
            case 15..<30:
                // dispatch: pop the least loaded, pending += 1, push back.
                guard let expected = model.minimum else { continue }
                let id = pool.pop()
                #expect(id == expected, "step \(step): pop returned \(String(describing: id)), model says \(expected)")
                guard let id else { continue }
                #expect(pool[id]?.index == nil)
                pool.addPending(1, to: id)
                model.pending[id]! += 1
                pool.markDispatched(id)
                model.dispatches += 1
                model.lastDispatch[id] = model.dispatches
                pool.push(id)
            case 30..<45:
                // completed: remove at its index, pending -= 1, push back.
                guard let id = model.inHeap.filter({ model.pending[$0]! > 0 }).randomElement(using: &rng) else { continue }
                let index = pool[id]!.index!
                #expect(pool.remove(at: index) == id)
                pool.addPending(-1, to: id)
                model.pending[id]! -= 1
                pool.push(id)
            case 45..<60:
                // fix(at:) after a change in place.
                guard let id = model.inHeap.randomElement(using: &rng) else { continue }
                let new = Int.random(in: 0..<20, using: &rng)
                pool.update(id, pending: new)
                model.pending[id] = new
            case 60..<70:
                // A worker leaves the heap (draining) and its record stays.
                guard let id = model.inHeap.randomElement(using: &rng) else { continue }
                pool.remove(at: pool[id]!.index!)
                model.inHeap.remove(id)
                #expect(pool[id]?.index == nil)
            case 70..<80:
                // A worker out of the heap comes back or is deleted.
                guard let id = model.pending.keys.filter({ !model.inHeap.contains($0) }).randomElement(using: &rng)
                else { continue }
                if Bool.random(using: &rng) {
                    pool.push(id)
                    model.inHeap.insert(id)
                } else {
                    pool.delete(id)
                    // What it held stays with its group.
                    if let group = model.group[id] { model.held[group]! += model.workerHeld[id, default: 0] }
                    model.workerHeld[id] = nil
                    model.pending[id] = nil
                    model.lastDispatch[id] = nil
                    model.group[id] = nil
                    #expect(pool[id] == nil)
                }
            case 80..<85:
                // Load is held against a group, or some of it given back.
                guard let (group, load) = model.held.randomElement(using: &rng) else { continue }
                let delta = load > 0 && Bool.random(using: &rng) ? -Int.random(in: 1...load, using: &rng) : 1
                pool.addGroupLoad(delta, to: group)
                model.held[group]! += delta
            case 85..<90:
                // Load is held against a worker, in the heap or out of it, or some of it given back.
                guard let id = model.pending.keys.randomElement(using: &rng) else { continue }
                let load = model.workerHeld[id, default: 0]
                let delta = load > 0 && Bool.random(using: &rng) ? -Int.random(in: 1...load, using: &rng) : 1
                pool.addHeldLoad(delta, to: id)
                model.workerHeld[id] = load + delta
            default:
                // Pop and push straight back.
                guard let id = pool.pop() else { continue }
                pool.push(id)
            }
            #expect(pool.isValid, "heap invalid after step \(step)")
            #expect(pool.count == model.inHeap.count)
            #expect(pool.min == model.minimum, "step \(step)")
            let sums = model.groupSums
            for (id, pending) in model.pending {
                #expect(pool[id]?.pending == pending)
                #expect(pool[id]?.held == model.workerHeld[id, default: 0])
                #expect(pool.groupPending(of: id) == model.groupPending(id, sums))
                #expect((pool[id]?.index != nil) == model.inHeap.contains(id))
            }
        }
    }

    @Test("ties go to the lowest id")
    func tiesGoToTheLowestID() {
        var pool = Self.idlePool([4, 2, 7, 0, 5])
        var order: [Int] = []
        while let id = pool.pop() { order.append(id) }
        #expect(order == [0, 2, 4, 5, 7])
    }

    /// Makes `count` dispatches that each complete at once (pop, mark, push
    /// back) and returns the workers they went to, in order.
    /// A pool of idle workers `ids`, all in the heap, inserted in that order;
    /// with `perGroup`, worker `id` is in group `id / perGroup`.
    static func idlePool(_ ids: some Sequence<Int>, perGroup: Int? = nil) -> Pool {
        var pool = Pool()
        for id in ids {
            pool.insert(id, group: perGroup.map { id / $0 })
            pool.push(id)
        }
        return pool
    }

    static func dispatchesCompletingAtOnce(_ count: Int, in pool: inout Pool) -> [Int] {
        (0..<count).map { _ in
            let id = pool.pop()!
            pool.markDispatched(id)
            pool.push(id)
            return id
        }
    }

    @Test("among equal pending, the worker dispatched to least recently comes first")
    func tiesGoToTheLeastRecentlyDispatched() {
        var pool = Self.idlePool(0..<3)
        // Dispatches that each complete at once: round-robin, not always worker 0.
        #expect(Self.dispatchesCompletingAtOnce(6, in: &pool) == [0, 1, 2, 0, 1, 2])
        #expect(pool.isValid)
    }

    @Test("among idle workers, the one whose group has the fewest pending comes first")
    func tiesGoToTheLeastLoadedGroup() {
        // Two backends of three connections each: workers 0-2 in group 0, 3-5 in group 1.
        var pool = Self.idlePool(0..<6, perGroup: 3)
        // Worker 0 takes a request and keeps it: group 0 has one in flight.
        let first = pool.pop()!
        #expect(first == 0)
        pool.addPending(1, to: first)
        pool.markDispatched(first)
        pool.push(first)
        // Requests that complete at once now go to group 1 only, in turn, though
        // workers 1 and 2 are as idle as 3 to 5 (least recently dispatched alone would pick 1).
        #expect(Self.dispatchesCompletingAtOnce(6, in: &pool) == [3, 4, 5, 3, 4, 5])
        // The request on worker 0 ends: group 0 is idle again and its idle workers come back first.
        pool.remove(at: pool[0]!.index!)
        pool.addPending(-1, to: 0)
        pool.push(0)
        #expect(pool.groupPending(of: 1) == 0)
        #expect(pool.pop() == 1)
        #expect(pool.isValid)
    }

    @Test("load held against a group passes its idle workers over until it is given back")
    func heldGroupLoadPassesTheGroupOver() {
        // Workers 0-1 in group 0, 2-3 in group 1, all idle; group 0 would come first.
        var pool = Self.idlePool(0..<4, perGroup: 2)
        #expect(pool.min == 0)
        pool.addGroupLoad(1, to: 0)
        #expect(pool.groupPending(of: 1) == 1 && pool[1]?.pending == 0, "held by the group, not by a worker")
        #expect(Self.dispatchesCompletingAtOnce(4, in: &pool) == [2, 3, 2, 3])
        pool.addGroupLoad(-1, to: 0)
        #expect(pool.groupPending(of: 0) == 0)
        #expect(pool.min == 0)
        #expect(pool.isValid)
    }

    @Test("load held against a worker counts with its pending and in its group, and stays with the group when it leaves")
    func heldWorkerLoadCountsLikePending() {
        // Workers 0-1 in group 0, 2-3 in group 1, all idle.
        var pool = Self.idlePool(0..<4, perGroup: 2)
        pool.addHeldLoad(1, to: 0)
        #expect(pool[0]?.pending == 0 && pool[0]?.held == 1, "held, not pending")
        #expect(pool.groupPending(of: 1) == 1)
        #expect(Self.dispatchesCompletingAtOnce(4, in: &pool) == [2, 3, 2, 3], "group 0 is busier")
        // With group 1 as busy, the worker holding load still comes after its idle peers.
        pool.addHeldLoad(1, to: 2)
        #expect(Self.dispatchesCompletingAtOnce(4, in: &pool) == [1, 3, 1, 3])
        pool.addHeldLoad(-1, to: 2)
        #expect(pool.groupPending(of: 3) == 0)
        // Worker 0 leaves while it holds load: its group keeps it, to be given back there.
        pool.remove(at: pool[0]!.index!)
        pool.delete(0)
        #expect(pool.groupPending(of: 1) == 1)
        pool.addGroupLoad(-1, to: 0)
        #expect(pool.groupPending(of: 1) == 0)
        #expect(pool.isValid)
    }

    @Test("isValid detects a broken heap")
    func isValidDetectsABrokenHeap() {
        var pool = Self.idlePool(0..<4)
        #expect(pool.isValid)
        // Change pending without fixing: the heap's order no longer holds.
        pool.addPending(5, to: pool.min!)
        #expect(!pool.isValid)
        pool.fix(at: 0)
        #expect(pool.isValid)
    }
}
