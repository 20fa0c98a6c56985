// Package lemonade is a small layer over the generated lemonade.v1 stubs:
// the details of a failed call, and a Watch that outlives restarts.
package lemonade

import (
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Domain is the ErrorInfo domain of every error the server reports.
const Domain = "lemonade.v1"

// ErrorDetails is what a failed call says: its code and message, the
// ErrorInfo reason (MODEL_NOT_FOUND, SLOTS_PINNED, ...) and the request
// fields a BadRequest names. Reason is "" for errors gRPC itself produced
// (a deadline, an unknown method).
type ErrorDetails struct {
	Code      codes.Code
	Message   string
	Reason    string
	Domain    string
	Metadata  map[string]string
	BadFields []string
}

// Details reads the details of err, an error returned by a call. ok is
// false when err carries no gRPC status (it did not come from a call).
func Details(err error) (details ErrorDetails, ok bool) {
	st, ok := status.FromError(err)
	if !ok || err == nil {
		return ErrorDetails{}, false
	}
	details = ErrorDetails{Code: st.Code(), Message: st.Message()}
	for _, detail := range st.Details() {
		switch d := detail.(type) {
		case *errdetails.ErrorInfo:
			details.Reason, details.Domain, details.Metadata = d.GetReason(), d.GetDomain(), d.GetMetadata()
		case *errdetails.BadRequest:
			for _, violation := range d.GetFieldViolations() {
				details.BadFields = append(details.BadFields, violation.GetField())
			}
		}
	}
	return details, true
}

// Reason is the ErrorInfo reason of err, "" when it has none.
func Reason(err error) string {
	details, _ := Details(err)
	return details.Reason
}
