package lemonade

import (
	"sort"

	lemonadev1 "github.com/lemonade-grpc/lemonade-grpc/clients/go/gen/lemonade/v1"
)

// ToolCalls assembles the tool calls of a streamed Chat answer from its
// ToolCallDelta pieces: the first piece of a call (by Index) carries its
// Id and Name, every piece the next part of its Arguments (JSON text).
//
//	var calls lemonade.ToolCalls
//	for reply := range replies { calls.Add(reply.GetToolCalls()...) }
//	for _, call := range calls.Calls() { ... call.GetName(), call.GetArguments() }
type ToolCalls struct {
	byIndex map[uint32]*lemonadev1.ToolCall
}

// Add joins deltas, in the order they arrived, to the calls they belong to.
func (t *ToolCalls) Add(deltas ...*lemonadev1.ToolCallDelta) {
	if t.byIndex == nil {
		t.byIndex = map[uint32]*lemonadev1.ToolCall{}
	}
	for _, delta := range deltas {
		call, ok := t.byIndex[delta.GetIndex()]
		if !ok {
			call = &lemonadev1.ToolCall{}
			t.byIndex[delta.GetIndex()] = call
		}
		if call.Id == "" {
			call.Id = delta.GetId()
		}
		if call.Name == "" {
			call.Name = delta.GetName()
		}
		call.Arguments += delta.GetArguments()
	}
}

// Calls returns the calls assembled so far, in index order: whole once the
// stream has ended (FINISH_REASON_TOOL_CALLS). Put them on the assistant
// message you send back, then answer each with a "tool" message carrying
// its Id as ToolCallId.
func (t *ToolCalls) Calls() []*lemonadev1.ToolCall {
	indexes := make([]uint32, 0, len(t.byIndex))
	for index := range t.byIndex {
		indexes = append(indexes, index)
	}
	sort.Slice(indexes, func(i, j int) bool { return indexes[i] < indexes[j] })
	calls := make([]*lemonadev1.ToolCall, 0, len(indexes))
	for _, index := range indexes {
		calls = append(calls, t.byIndex[index])
	}
	return calls
}
