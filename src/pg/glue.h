/*
 * glue.h: what glue.c and session.c share. Errors raised inside a guarded
 * entry point are returned to Rust as an NgError (same layout as
 * crate::pg::glue::NgError), never thrown across Rust frames.
 */
#ifndef NEXTGRES_GLUE_H
#define NEXTGRES_GLUE_H

#include "utils/memutils.h"

typedef struct NgError
{
	char		sqlstate[6];
	char		message[512];
	char		detail[512];
	char		hint[512];
} NgError;

/* In a PG_CATCH block: copy the current error into err and clear it. */
extern void ng_capture_error(MemoryContext cxt, NgError *err);

#endif
